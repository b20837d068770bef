import pytest

from imgbench.errors import InvalidInputError
from imgbench.labels import safe_labels


def test_safe_labels_keep_valid_names():
    labels = safe_labels(["angular_leaf_spot", "healthy"], service="demo")
    assert labels.by_class == {"angular_leaf_spot": "angular_leaf_spot", "healthy": "healthy"}
    assert labels.changed == {}


def test_safe_labels_replace_odd_characters():
    labels = safe_labels(["bean rust", "Mr. Pickles", "crème brûlée"], service="demo",
                         allowed="A-Za-z0-9_")
    assert labels.label_of("bean rust") == "bean_rust"
    assert labels.label_of("Mr. Pickles") == "Mr_Pickles"
    assert labels.label_of("crème brûlée") == "creme_brulee"
    assert labels.class_of("creme_brulee") == "crème brûlée"


def test_safe_labels_reject_name_without_allowed_characters():
    with pytest.raises(InvalidInputError, match="'日本'"):
        safe_labels(["日本", "cat"], service="demo")


def test_safe_labels_reject_collision():
    with pytest.raises(InvalidInputError, match="'bean rust' and 'bean.rust' both become"):
        safe_labels(["bean rust", "bean.rust"], service="demo")


def test_safe_labels_cut_to_max_length():
    labels = safe_labels(["a" * 100], service="demo", max_length=32)
    assert labels.label_of("a" * 100) == "a" * 32


def test_unknown_label_passes_through():
    labels = safe_labels(["cat"], service="demo")
    assert labels.class_of("dog") == "dog"
