"""The recipes: Python modules with `get_config()`, addressable by name from anywhere.

`swav-jax train --config demo` and `--config swav_800ep` name a module of this package;
a path (`--config my_recipe.py`) names a file of your own, which can build on these:

    from swav_jax.configs import base

    def get_config():
        c = base.get_config()
        c.epochs = 100
        return c

Every key the code reads is defined in `base.py`. The first line of a recipe's docstring
says what it reproduces; `swav-jax configs` lists them.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The recipe names of this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([_DIR]) if not m.name.startswith("_"))


def resolve(name_or_path: str) -> str:
    """The file behind `--config`: an existing path as given, else a recipe of this
    package by name (`demo`, `demo.py`); a `:argument` suffix is kept.

    Raises:
      ValueError: neither a file nor a recipe name (the message lists the names).
    """
    path, colon, argument = name_or_path.partition(":")
    if os.path.isfile(path):
        return name_or_path
    name = path[:-3] if path.endswith(".py") else path
    if name in names():
        return os.path.join(_DIR, name + ".py") + colon + argument
    raise ValueError(
        f"--config {name_or_path!r} is neither a file nor a recipe name; "
        f"recipes: {', '.join(names())} (`swav-jax configs` describes them)"
    )


def describe(name: str) -> dict[str, str]:
    """The columns of `swav-jax configs` for the recipe `name`: method, network, crops,
    batch, epochs, and `about`, the first line of its docstring (what it reproduces)."""
    module = importlib.import_module(f"{__name__}.{name}")
    c = module.get_config()
    m = c.model
    network = m.arch + (f"w{m.width}" if m.width != 1 else "") + (f" (base {m.base_width})" if m.base_width != 64 else "")
    doc = (module.__doc__ or "").strip().splitlines()
    return {
        "name": name,
        "method": c.method,
        "network": network,
        "crops": " + ".join(f"{n}x{s}" for n, s in zip(c.crops.num_crops, c.crops.size_crops)),
        "batch": str(c.batch_size),
        "epochs": str(c.epochs),
        "about": doc[0] if doc else "",
    }
