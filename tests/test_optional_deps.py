"""The library without the application's dependencies: scikit-learn and matplotlib come with the ``demo`` extra.

Both are blocked the way a missing package looks (``sys.modules[name] = None``: importing raises ImportError and
``importlib.util.find_spec`` returns None, as on an install without them)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import importlib, importlib.util, pkgutil, sys, warnings
    for name in ("sklearn", "matplotlib"):
        sys.modules[name] = None
    assert importlib.util.find_spec("sklearn") is None and importlib.util.find_spec("matplotlib") is None
    import vitprune_fast
    for info in pkgutil.walk_packages(vitprune_fast.__path__, "vitprune_fast."):
        importlib.import_module(info.name)  # every module of the package imports without them
    loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("sklearn", "matplotlib") and sys.modules[k])
    assert not loaded, loaded
    from vitprune_fast import cli
    args = ["prune", "--model", "deit_tiny_patch16_224", "--model-args", sys.argv[1], "--keep", "0.5", "--quiet",
            "--out", sys.argv[2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(args) == 0  # the library's commands work; the plots are skipped with one warning
    assert [str(w.message) for w in caught if "matplotlib" in str(w.message)], caught
    try:
        cli.main(["demo", "--fast", "--out", sys.argv[2] + "-demo"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("the demo ran without scikit-learn")
''')


def test_the_library_imports_and_prunes_without_sklearn_and_matplotlib(tmp_path):
    model_args = json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8})
    r = subprocess.run([sys.executable, "-c", SCRIPT, model_args, str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "widths.png").exists()
    err = r.stderr.strip().splitlines()
    assert any("the embedded 'digits' data needs scikit-learn: pip install 'vitprune_fast[demo]'" in line
               for line in err), r.stderr[-2000:]
