"""One-dimensional noise laws: exact densities, tails, moments and exact samplers.

The laws live in :mod:`accountant.laws`, one class per file, with the registry that names them; this
module re-exports the public names (``from accountant.noise import Gaussian`` keeps working).
"""
from __future__ import annotations

from accountant.laws import (LATTICE, LMO, LMO_MAX_MOMENT, REGISTRY, Gaussian, GeneralizedGaussian, Laplace,
                             LaplaceMixture, Noise, NoiseParameterError, Piece, Tabulated, from_json, from_name,
                             to_json, unimodality_violation)
from accountant.laws.base import _positive
from accountant.laws.tabulated import _exact_width, _exactly_denser

__all__ = ["Noise", "NoiseParameterError", "Piece", "Gaussian", "Laplace", "GeneralizedGaussian", "LMO",
           "LMO_MAX_MOMENT", "LaplaceMixture", "Tabulated", "LATTICE", "unimodality_violation", "from_name",
           "from_json", "to_json", "REGISTRY", "_positive", "_exact_width", "_exactly_denser"]
