"""Data: sources -> manifest -> split -> preprocessed uint8 arrays.

Only the first stage (``stages/acquire.py``) knows where images come from. Every source ends in
``data/raw/manifest.csv`` with one row per image:

``path``            image file; relative paths are relative to the manifest's folder
``class``           NORMAL, CNV, DME or DRUSEN
``patient``         patient id (the ``<patientID>`` of ``<CLASS>-<patientID>-<imageNo>.jpeg``, or
                    from a ``patients.csv``); empty when unknown
``official_split``  ``train`` or ``test`` (Kaggle's small ``val`` folder is merged into test)
``mask``            lesion mask PNG (same size as the image, nonzero = lesion), or empty

The split stage writes ``data/splits/{train,val,test}.csv`` with columns
``path, label, class, patient, mask`` (label 0 = NORMAL, 1 = disease; paths resolved so that they
open from the repository root). The preprocess stage writes, per split, ``data/processed/<split>.npy``
(uint8, shape ``[N, 1, S, S]``), ``<split>_masks.npy`` (uint8 0/1, same shape, when the source has
masks), ``<split>.csv`` (the rows kept, in array order) and ``skipped.csv`` (file, reason).
"""

# Image files every source and ``sparsegan predict`` read (any case).
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp"})
# DICOM files ``sparsegan predict`` reads (every frame one B-scan; any other file named explicitly
# is tried as DICOM too when it carries the DICM preamble).
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
