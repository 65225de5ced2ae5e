"""Simulation: whole federations in one command (``fedmq simulate``, ``--split``, ``fedmq
fleet``), the heterogeneity they draw and the reports they write. Its import contract is in
pyproject.toml; why it may read the composition root's settings and wiring:
docs/architecture.md, "Decision: gateway and simulation as packages"."""
