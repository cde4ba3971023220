"""The compiler: a fitted scikit-learn pipeline becomes one signed `.edgebundle`.

Entry point: :func:`compiler.compile.compile_bundle` (CLI: `edgefleet compile`).
"""

__all__: list[str] = []
