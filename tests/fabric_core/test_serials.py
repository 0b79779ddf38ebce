"""The serial rule: strictly newer for the same document, per-(group, location) anti-rollback."""

from __future__ import annotations

import pytest

from fabric_core.errors import PolicycastError, StaleSerial
from fabric_core.serials import NO_SERIAL, is_newer, require_applicable, require_newer

HERE = (1, 10)
THERE = (1, 20)
ELSEWHERE = (2, 10)
UNKNOWN = (9, 90)


def test_no_serial_is_zero() -> None:
    assert NO_SERIAL == 0


@pytest.mark.parametrize(("offered", "held"), [(1, 0), (2, 1), (100, 99), (10**12, 5)])
def test_require_newer_accepts_a_strictly_greater_serial(offered: int, held: int) -> None:
    assert is_newer(offered, held)
    require_newer(offered, held)


@pytest.mark.parametrize(("offered", "held"), [(0, 0), (5, 5), (4, 5), (1, 100), (0, 1)])
def test_require_newer_rejects_an_equal_or_older_serial(offered: int, held: int) -> None:
    assert not is_newer(offered, held)
    with pytest.raises(StaleSerial) as info:
        require_newer(offered, held)
    assert info.value.offered == offered
    assert info.value.held == held
    assert str(offered) in str(info.value)
    assert str(held) in str(info.value)
    assert isinstance(info.value, PolicycastError)


HIGH_WATER = {HERE: 50, THERE: 30, ELSEWHERE: 70}


@pytest.mark.parametrize("offered", [51, 52, 1000])
def test_same_key_accepts_strictly_greater_than_its_high_water(offered: int) -> None:
    require_applicable(offered=offered, offered_key=HERE, current_key=HERE, high_water=HIGH_WATER)


@pytest.mark.parametrize("offered", [50, 49, 1, 0])
def test_same_key_rejects_equal_or_lower_than_its_high_water(offered: int) -> None:
    with pytest.raises(StaleSerial) as info:
        require_applicable(offered=offered, offered_key=HERE, current_key=HERE, high_water=HIGH_WATER)
    assert (info.value.offered, info.value.held) == (offered, 50)


@pytest.mark.parametrize(("offered_key", "offered"), [(THERE, 30), (THERE, 31), (THERE, 45), (ELSEWHERE, 70)])
def test_other_key_accepts_not_below_that_keys_high_water_equal_allowed(
    offered_key: tuple[int, int], offered: int
) -> None:
    # lower than the current document's high-water (50) is fine: the other location changed less recently
    require_applicable(offered=offered, offered_key=offered_key, current_key=HERE, high_water=HIGH_WATER)


@pytest.mark.parametrize(
    ("offered_key", "offered"), [(THERE, 29), (THERE, 1), (ELSEWHERE, 69), (ELSEWHERE, 51)]
)
def test_other_key_rejects_below_that_keys_high_water(offered_key: tuple[int, int], offered: int) -> None:
    with pytest.raises(StaleSerial) as info:
        require_applicable(offered=offered, offered_key=offered_key, current_key=HERE, high_water=HIGH_WATER)
    assert info.value.held == HIGH_WATER[offered_key]


def test_other_key_is_judged_by_its_own_high_water_not_the_current_one() -> None:
    # 40 is below HERE's 50 but above THERE's 30: applicable when moving to THERE
    require_applicable(offered=40, offered_key=THERE, current_key=HERE, high_water=HIGH_WATER)
    # 60 is above HERE's 50 but below ELSEWHERE's 70: a rollback of ELSEWHERE
    with pytest.raises(StaleSerial):
        require_applicable(offered=60, offered_key=ELSEWHERE, current_key=HERE, high_water=HIGH_WATER)


@pytest.mark.parametrize("current_key", [HERE, THERE, None, UNKNOWN])
@pytest.mark.parametrize("offered", [1, 2, 10**9])
def test_unknown_key_accepts_any_serial_from_one(current_key: tuple[int, int] | None, offered: int) -> None:
    require_applicable(offered=offered, offered_key=UNKNOWN, current_key=current_key, high_water=HIGH_WATER)


@pytest.mark.parametrize("offered", [1, 7])
def test_agent_with_nothing_applied_accepts_any_serial_from_one(offered: int) -> None:
    require_applicable(offered=offered, offered_key=HERE, current_key=None, high_water={})
    require_applicable(offered=offered, offered_key=HERE, current_key=HERE, high_water={})


@pytest.mark.parametrize("offered", [0, -1])
def test_unknown_current_key_rejects_below_one(offered: int) -> None:
    with pytest.raises(StaleSerial):
        require_applicable(offered=offered, offered_key=UNKNOWN, current_key=UNKNOWN, high_water=HIGH_WATER)


@pytest.mark.parametrize("offered", [-1, -100])
def test_unknown_other_key_rejects_negative(offered: int) -> None:
    with pytest.raises(StaleSerial):
        require_applicable(offered=offered, offered_key=UNKNOWN, current_key=HERE, high_water=HIGH_WATER)


@pytest.mark.parametrize("current_key", [HERE, None])
def test_unknown_other_key_rejects_serial_zero(current_key: tuple[int, int] | None) -> None:
    with pytest.raises(StaleSerial):
        require_applicable(offered=0, offered_key=UNKNOWN, current_key=current_key, high_water=HIGH_WATER)


def test_switching_back_and_forth_never_goes_back() -> None:
    high_water: dict[tuple[int, int], int] = {}
    current = None
    for key, serial in [(HERE, 5), (THERE, 3), (HERE, 5), (HERE, 8), (THERE, 3), (THERE, 9)]:
        require_applicable(offered=serial, offered_key=key, current_key=current, high_water=high_water)
        high_water[key] = max(high_water.get(key, 0), serial)
        current = key
    for key, serial in [(HERE, 7), (THERE, 9)]:
        with pytest.raises(StaleSerial):
            require_applicable(offered=serial, offered_key=key, current_key=THERE, high_water=high_water)
