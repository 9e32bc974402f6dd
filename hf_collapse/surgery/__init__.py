"""Delete transformer layers for real, leaving a plain, smaller model of the same family.

`rules` says how each per-layer config field follows the kept layers, `apply` plans, makes and undoes the removal,
`verify` checks it against a model rebuilt from the new config and on a probe input.
"""

from .apply import CollapseRecord, collapse_layers, collapsed_config

__all__ = ["CollapseRecord", "collapse_layers", "collapsed_config"]
