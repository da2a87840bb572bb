"""TFDS builders for the paper's data sets that the TFDS catalogue lacks.

Each builder downloads through the TFDS download manager, or reads the original archive from
``manual_dir`` (``<data_dir>/downloads/manual``) when it is already there -- the way to prepare
them on a machine without internet access.
"""
