"""Adapters to the tools users already work in (optional dependencies, imported on use).

* ``sklearn``: scikit-learn / PyOD outlier estimators over the CRD scorer and the NN baseline;
* ``anomalib``: ``Crd``, an anomalib 2.x model with the detector's options and its label-free choice.
"""
