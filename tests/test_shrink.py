"""Delta debugging over fault lists, without processes."""

from chaos.run.shrink import ddmin


async def test_ddmin_finds_the_pair_that_matters():
    calls = []

    async def fails(ids):
        calls.append(list(ids))
        return 3 in ids and 7 in ids

    assert await ddmin(list(range(1, 13)), fails) == [3, 7]
    assert len(calls) < 40


async def test_ddmin_single_culprit_and_no_fault_needed():
    async def needs_five(ids):
        return 5 in ids

    assert await ddmin([1, 2, 3, 4, 5, 6], needs_five) == [5]

    async def always(ids):
        return True

    assert await ddmin([1, 2, 3], always) == []


async def test_ddmin_keeps_everything_when_all_are_needed():
    async def all_three(ids):
        return {1, 2, 3} <= set(ids)

    assert sorted(await ddmin([1, 2, 3], all_three)) == [1, 2, 3]
