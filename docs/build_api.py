"""Build the API reference from the docstrings with pdoc; any pdoc warning is an error.

    python docs/build_api.py                 # -> docs/api/index.html (not committed)
    python docs/build_api.py --out /tmp/api

pdoc reports what it cannot document (a module that fails to import, an unresolvable
annotation, a broken docstring link) as a Python warning and carries on; here every such warning
fails the build, so the reference never silently drops a page. Run in CI by
``tests/test_docs.py``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def modules() -> list[str]:
    """``hashrec`` and every submodule but ``__main__``. pdoc follows a package's ``__all__``,
    which lists hashrec's public names, not its subpackages: so name them all."""
    import pkgutil

    import hashrec

    found = [m.name for m in pkgutil.iter_modules(hashrec.__path__, "hashrec.")]
    return ["hashrec", *sorted(m for m in found if not m.endswith("__main__"))]


def build(out: Path) -> list[str]:
    """Render the reference into ``out``; return the warnings pdoc raised (empty = clean)."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", footer_text="hashrec API reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules(), output_directory=out)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "api")
    args = p.parse_args(argv)
    problems = build(args.out)
    for msg in problems:
        print(f"build_api: error: {msg}", file=sys.stderr)
    if problems:
        return 1
    print(f"wrote {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
