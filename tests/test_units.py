import pytest

from neuroshard.types import UsageError
from neuroshard.units import parse_memory, parse_memory_list


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GB", 4 << 30),
        ("4 GiB", 4 << 30),
        ("512MiB", 512 << 20),
        ("1073741824", 1 << 30),
        ("0.5GB", 1 << 29),
        ("1.5KB", 1536),
        ("2TB", 2 << 40),
    ],
)
def test_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("0.5B", "out of range"),
        ("0", "out of range"),
        ("1.5B", "whole number"),
        ("4XB", "not a memory size"),
        ("-4GB", "not a memory size"),
        ("", "not a memory size"),
        ("2000000TB", "out of range"),
    ],
)
def test_bad_sizes_name_the_option(text, words):
    with pytest.raises(UsageError, match=f"--memory: .*{words}"):
        parse_memory(text)


def test_one_cap_per_device_or_one_for_all():
    assert parse_memory_list("1GB", 3) == (1 << 30,) * 3
    assert parse_memory_list("1GB,2GB", 2) == (1 << 30, 2 << 30)
    with pytest.raises(UsageError, match="2 caps for 3 devices"):
        parse_memory_list("1GB,2GB", 3)
