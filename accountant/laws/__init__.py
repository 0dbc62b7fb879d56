"""Noise laws, one class per file, and the registry that names them.

``REGISTRY`` maps a family name to its class; a class registers itself by subclassing
:class:`Noise` with its own ``family``.  :func:`to_json` / :func:`from_json` round-trip any registered
law, :func:`from_name` builds one from its name and parameters, and the command line offers every
law that declares ``cli_params`` (docs/accountant-api.md, "Adding a noise law").
"""
from __future__ import annotations

from accountant.laws.base import REGISTRY, Noise, NoiseParameterError, Piece
from accountant.laws.gaussian import Gaussian
from accountant.laws.gengauss import GeneralizedGaussian
from accountant.laws.laplace import Laplace
from accountant.laws.laplace_mixture import LaplaceMixture
from accountant.laws.lmo import LMO, LMO_MAX_MOMENT
from accountant.laws.tabulated import LATTICE, Tabulated, unimodality_violation

__all__ = ["REGISTRY", "Noise", "NoiseParameterError", "Piece", "Gaussian", "Laplace", "GeneralizedGaussian",
           "LMO", "LMO_MAX_MOMENT", "LaplaceMixture", "Tabulated", "LATTICE", "unimodality_violation",
           "law_class", "from_name", "to_json", "from_json", "cli_laws"]


def law_class(name: str) -> type:
    """The registered class of family ``name`` (one line naming the known ones otherwise)."""
    if name not in REGISTRY:
        raise NoiseParameterError(f"unknown noise family {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def from_name(name: str, **params) -> Noise:
    """Build a parametric law from its family name and parameters (as stored in table metadata)."""
    return law_class(name).from_json({"family": name, "params": params})


def to_json(noise: Noise) -> dict:
    return noise.to_json()


def from_json(data: dict) -> Noise:
    if not isinstance(data, dict) or "family" not in data:
        raise NoiseParameterError("a noise law in JSON is an object with a \"family\" key")
    return law_class(data["family"]).from_json(data)


def cli_laws() -> dict:
    """{family: class} of the laws the command line builds from ``--PARAM`` options."""
    return {name: cls for name, cls in REGISTRY.items() if cls.cli_params}
