"""Installed distributions made up for tests: entry points seen by importlib.metadata."""


def install_fake_distribution(root, name, entry_points, modules=None):
    """A distribution on ``root`` (a ``*.dist-info`` with entry points, and its modules), which
    importlib.metadata finds like an installed package once ``root`` is on sys.path."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dllm_decode]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, text in (modules or {}).items():
        (root / f"{module}.py").write_text(text)
    return root
