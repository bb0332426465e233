"""The README's Flax example runs as written and trains the model."""
import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block_after(heading: str) -> str:
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text[text.index(heading):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_flax_example_trains_a_model_with_a_pretrained_optimizer(debian_fashion_mnist):
  # The example reads Debian's folder by its path, as a user would.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_block_after("### Train a Flax model from scratch"), "README.md", "exec"), {})
  losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", out.getvalue())]
  assert len(losses) == 5, out.getvalue()
  # ln(10) = 2.30 at the start; the pretrained optimizer must take it well below.
  assert losses[0] > 2.0 and losses[-1] < 1.2, losses
