"""Every ```python block of README.md runs, in order, in one namespace (as a reader pastes them):
on a trained `configs/digits.py:runlocal` workdir for "runs/digits" and on its PyTorch export
imported back (`convert export-torch` then `import-torch`) for "runs/hcsc_imported"."""

import os
import re

import numpy as np
import pytest

from hcsc_jax import convert

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", open(README).read(), flags=re.M | re.S)


@pytest.fixture(scope="module")
def imported(digits_run, tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("imported")
    assert convert.main(["export-torch", digits_run, str(root / "encoder.pth")]) == 0
    assert convert.main(["import-torch", str(root / "encoder.pth"), str(root / "imported")]) == 0
    return str(root / "imported")


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs(digits_run, imported, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 5  # load + features, an imported file, linear probe, fine-tuning, plain Orbax
    namespace = {}
    for i, block in enumerate(blocks):
        code = block.replace('"runs/digits', f'"{digits_run}')
        code = code.replace('"runs/hcsc_imported"', f'"{imported}"')
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    ns = namespace
    assert ns["feats"].shape == (2, ns["imported"].num_features) and ns["z"].shape == (5, 16)
    assert ns["imported"].input == ns["enc"].input  # the input travelled with the export
    probe = float(re.search(r"linear probe top-1: ([0-9.]+)", capsys.readouterr().out).group(1))
    assert probe > 0.5  # ten classes: chance is 0.1
    assert float(np.mean(np.asarray(ns["predictions"]) == ns["test"].labels)) > 0.2
    assert ns["meta"]["encoder"]["model"]["arch"] == "resnet18" and ns["step"] == ns["enc"].meta["step"]
    np.testing.assert_array_equal(  # plain Orbax reads the weights hcsc_jax loads
        np.asarray(ns["state"]["q_params"]["backbone"]["conv1"]["kernel"]["value"]),
        np.asarray(ns["enc"].module.backbone.conv1.kernel[...]))


def test_the_file_table_names_every_module_where_it_lives():
    """docs/architecture.md's table names each module of hcsc_jax by its path (a subpackage of its
    own, like data/ or evaluators/, by its folder), so the table shows the layout a reader finds;
    a module added, moved or renamed without the table fails here."""
    table = open(os.path.join(os.path.dirname(README), "docs", "architecture.md")).read()
    package = os.path.join(os.path.dirname(README), "hcsc_jax")
    missing = []
    for group in ("", "method", "run"):  # the folders whose modules are listed one by one
        for name in sorted(os.listdir(os.path.join(package, group))):
            path = "/".join(filter(None, ("hcsc_jax", group, name)))
            if name.endswith(".py") and name != "__init__.py" and f"`{path}`" not in table:
                missing.append(path)
            subpackage = os.path.join(package, group, name, "__init__.py")
            if group == "" and name not in ("method", "run") and os.path.exists(subpackage) \
                    and f"`{path}/`" not in table:
                missing.append(path + "/")
    assert not missing, f"docs/architecture.md's table does not name {missing}"
