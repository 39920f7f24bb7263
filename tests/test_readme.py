"""The README's example runs as written."""
import pathlib
import re


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves a state_dict
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["x_mid"].shape == scope["x"].shape
    assert (tmp_path / "gauss.pt").exists()
