"""Analyses of trained models: spectra, CKA, depth trajectories, hidden-state geometry.

Modules are imported directly (``from qlab.analysis.spectra import spectral_summary``);
this package file stays import-free so the submodules can depend on each other and on
the rest of qlab without circular imports.
"""
