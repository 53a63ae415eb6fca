"""The gate: what a change must pass before it is promoted, checked alike by ``make review`` and ``make promote``.

- :mod:`datamart.gate.checks`: the list of checks (``CHECKS``), ``run_checks`` for the review and ``enforce`` for
  the promotion.
- :mod:`datamart.gate.contract`: the published views may gain columns, never lose, rename or retype one.
- :mod:`datamart.gate.lineage`: no personal column reaches a published view unless allowed (column lineage).
- :mod:`datamart.gate.base`: what a check receives and returns.

It imports neither ``review`` nor ``transform`` nor ``privacy``: they import it.
"""
