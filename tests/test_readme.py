"""The README's examples run as written (one scope, in order)."""
import pathlib
import re


def test_readme_examples_run(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the example saves a state_dict
    scope = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md[python block {i}]", "exec"), scope)
    assert scope["x_mid"].shape == scope["x"].shape
    assert (tmp_path / "gauss.pt").exists()
    assert scope["res"].n_evals == 2 * (18 - 5) - 1  # Heun on the 13 steps left after the teleport
