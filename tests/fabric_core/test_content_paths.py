"""fabric_core.content_paths: the one path rule the manager and the agents apply to a manifest."""

from __future__ import annotations

import pytest

from fabric_core.content_paths import MAX_PATH_LENGTH, ContentPathError, check_manifest_paths, check_path

BAD = [
    ("", "empty"),
    ("/abs", "relative"),
    ("../up", "'..'"),
    ("a/../b", "'..'"),
    ("./a", "'.'"),
    ("a/./b", "'.'"),
    ("a//b", "empty"),
    ("a/", "empty"),
    ("a\\b", "backslash"),
    ("a\x00b", "control character"),
    ("a\nb", "control character"),
    ("a\rb", "control character"),
    ("a\ud800", "lone surrogate"),
    ("x" * (MAX_PATH_LENGTH + 1), "longer than"),
]


@pytest.mark.parametrize(("path", "reason"), BAD, ids=[repr(p)[:24] for p, _ in BAD])
def test_a_path_that_could_escape_or_mean_two_things_is_refused(path, reason):
    with pytest.raises(ContentPathError, match=reason):
        check_path(path)


@pytest.mark.parametrize(
    "path", ["a", "a/b/c.db", ".hidden", "dots...", "a..b", "sp ace/ü", "x" * MAX_PATH_LENGTH]
)
def test_plain_relative_paths_pass(path):
    assert check_path(path) == path


@pytest.mark.parametrize(
    ("paths", "reason"),
    [
        (["a", "a"], "twice"),
        (["a", "a/b"], "both a file and a directory"),
        (["a/b/c", "a/b"], "both a file and a directory"),
        (["ok", "./bad"], "'.'"),
    ],
)
def test_a_manifest_whose_paths_clash_is_refused(paths, reason):
    with pytest.raises(ContentPathError, match=reason):
        check_manifest_paths(paths)


def test_a_manifest_of_distinct_files_passes():
    check_manifest_paths(["a/b", "a/c", "ab", "a.b/c"])


def test_the_error_is_a_value_error():
    assert issubclass(ContentPathError, ValueError)
