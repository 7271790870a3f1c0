import anyio
import anyio.lowlevel
import pytest

from asyncbg._spend._limiter import Limiter

pytestmark = pytest.mark.asyncio


async def test_limits_and_serves_in_order() -> None:
    limiter = Limiter(2)
    inside = 0
    peak = 0
    order: list[int] = []

    async def work(i: int) -> None:
        nonlocal inside, peak
        async with limiter:
            order.append(i)
            inside += 1
            peak = max(peak, inside)
            await anyio.sleep(0.005)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(work, i)
            await anyio.lowlevel.checkpoint()  # start them in order
    assert peak == 2 and order == list(range(8))
    assert limiter._free == 2 and limiter.waiting == 0


async def test_a_cancelled_waiter_gives_up_its_place_and_loses_no_slot() -> None:
    limiter = Limiter(1)
    await limiter.acquire()
    with anyio.move_on_after(0.01):
        await limiter.acquire()  # cancelled while waiting
    assert limiter.waiting == 0
    limiter.release()
    await limiter.acquire()  # the slot came back
    limiter.release()
    assert limiter._free == 1


async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    limiter = Limiter(1)
    await limiter.acquire()
    got: list[str] = []

    async def waiter(name: str, scope: anyio.CancelScope | None = None) -> None:
        if scope is None:
            await limiter.acquire()
            got.append(name)
            limiter.release()
            return
        with scope:
            await limiter.acquire()
            got.append(name)  # the hand-off may win the race against the cancel
            limiter.release()

    first = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", first)
        await anyio.sleep(0.005)
        tg.start_soon(waiter, "second")
        await anyio.sleep(0.005)
        limiter.release()  # handed to "first"...
        first.cancel()     # ...which is cancelled before it runs
    assert got[-1] == "second" and limiter._free == 1 and limiter.waiting == 0
    with pytest.raises(ValueError):
        Limiter(0)
