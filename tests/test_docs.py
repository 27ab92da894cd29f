"""docs/: the recipe reference is generated from the config dataclasses and kept in sync; every key has
text; code comments name only files that are in the repository."""
import re

from megavlm.config import reference
from tests.conftest import ROOT


def test_every_recipe_key_is_documented():
    assert reference.undocumented() == [], "add a comment on the field (or a KEY_HELP entry)"


def test_recipe_reference_is_up_to_date():
    assert (ROOT / "docs" / "recipes.md").read_text() == reference.render(), \
        "regenerate: python -m megavlm.config.reference > docs/recipes.md"


def test_reference_covers_nested_and_list_sections():
    keys = {key for _, _, rows in reference.collect() for key, *_ in rows}
    assert {"data.augment.jitter", "data.sources[].weight", "stage.lora.rank", "model.vision.feature_layer",
            "train.max_steps", "data.drop_images"} <= keys


def test_code_comments_reference_only_files_in_the_repository():
    pattern = re.compile(r"Principle \d|\.\./shared|DESIGN\.md|MEGATRON_CORE_ON_CPU")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("megavlm", "kernels", "tools", "examples", "tests", "csrc")
                 for path in sorted((ROOT / folder).rglob("*")) if path.suffix in (".py", ".sh", ".yaml", ".cpp", ".h")
                 for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1)
                 if pattern.search(line) and path.name != "test_docs.py"]
    assert offenders == []


def test_architecture_page_names_files_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:megavlm|examples|tools|tests|kernels|csrc)/[\w./<>-]+)`", text))
    assert len(paths) > 20
    missing = [p for p in paths if "<" not in p and not (ROOT / p.rstrip("/")).exists()]
    assert missing == []
