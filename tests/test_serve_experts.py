"""The server's expert list without a server: names, replace, and unloads that wait for the
requests in flight (a stand-in engine records the RPCs)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from t2fast.mixtures import Mixture
from t2fast.serve import experts as served
from t2fast.serve.experts import ServedExperts
from t2fast.serve.translate import T2HTTPError
from t2fast.vllm.frontend import FrontEnd

EXPERT = str(Path(__file__).resolve().parent.parent / "experts" / "arith.safetensors")


class FakeEngine:
    """``collective_rpc`` of one worker whose bank follows the calls."""

    def __init__(self, names):
        self.names = list(names)
        self.calls = []

    async def collective_rpc(self, method, args=()):
        self.calls.append(method)
        if method == "t2_load_experts":
            for e in args[0]:
                if e["name"] not in self.names:
                    self.names.append(e["name"])
        elif method == "t2_unload_experts":
            self.names = [n for n in self.names if n not in args[0]]
        return [{"names": list(self.names)}]


def make(names=("math",)):
    fe = FrontEnd(num_layers=4, max_experts=3)
    for n in names:
        fe.add(n, "digest")
    return ServedExperts(FakeEngine(names), fe, ["tiny"], {n: f"{n}.safetensors" for n in names})


def uses(name):
    return Mixture(((name, 1.0),))


def test_names_are_checked_and_cards_name_the_base():
    ex = make()
    for bad in ("../x", "a/b", "x" * 65, "base", "tiny", "", 3):
        with pytest.raises(T2HTTPError) as err:
            ex.check_name(bad)
        assert int(err.value.status) == 400
    card = ex.card("math")   # names the expert, not its file: no server path in responses
    assert card["parent"] == "tiny" and card["root"] == "math"


def test_load_replace_conflict_and_capacity():
    async def run():
        ex = make()
        card = await ex.load("arith", EXPERT)
        assert card["id"] == "arith" and ex.names == ["math", "arith"]
        with pytest.raises(T2HTTPError, match="replace") as err:
            await ex.load("arith", EXPERT)
        assert int(err.value.status) == 409
        old = ex.frontend.digests["arith"]
        await ex.load("arith", EXPERT, replace=True)
        assert ex.names == ["math", "arith"] and ex.frontend.digests["arith"] == old
        with pytest.raises(T2HTTPError, match="does not exist"):
            await ex.load("x", EXPERT.replace("arith", "missing"))
        await ex.load("third", EXPERT)
        with pytest.raises(T2HTTPError, match=r"bank holds 3 experts \(max_experts\); 3 are "
                                              r"loaded and 1 more were given.*--max-experts"
                           ) as err:
            await ex.load("fourth", EXPERT)
        assert int(err.value.status) == 409
        assert ex.engine_client.calls.count("t2_load_experts") == 3

    asyncio.run(run())


def test_unload_waits_for_requests_in_flight(monkeypatch):
    async def run():
        ex = make(("math", "code"))
        used = await ex.acquire(uses("math"))
        assert used == ["math"] and ex.in_flight["math"] == 1
        unload = asyncio.create_task(ex.unload("math"))
        await asyncio.sleep(0.05)
        # new requests can no longer name it; the worker still has it
        assert ex.names == ["code"] and not unload.done()
        assert "t2_unload_experts" not in ex.engine_client.calls
        with pytest.raises(ValueError, match="unknown expert 'math'"):
            ex.parse({"expert": "math"})
        await ex.release(used)
        assert (await unload)["deleted"]
        assert ex.engine_client.names == ["code"]
        with pytest.raises(T2HTTPError) as err:
            await ex.unload("math")
        assert int(err.value.status) == 404

        # a request that never finishes: the unload gives up, and the expert is back in place
        monkeypatch.setattr(served, "DRAIN_TIMEOUT_S", 0.1)
        await ex.load("math", EXPERT)
        await ex.acquire(uses("code"))
        with pytest.raises(T2HTTPError, match="still used") as err:
            await ex.unload("code")
        assert int(err.value.status) == 409 and ex.names == ["code", "math"]

    asyncio.run(run())


def test_replace_waits_for_old_requests_and_holds_new_ones():
    async def run():
        ex = make(("math",))
        old = await ex.acquire(uses("math"))
        replace = asyncio.create_task(ex.load("math", EXPERT, replace=True))
        await asyncio.sleep(0.05)
        assert not replace.done() and "t2_load_experts" not in ex.engine_client.calls
        newer = asyncio.create_task(ex.acquire(uses("math")))
        await asyncio.sleep(0.05)
        assert not newer.done()            # held until the new z is in the workers
        await ex.release(old)
        await replace
        assert await newer == ["math"] and ex.engine_client.calls == ["t2_load_experts"]
        assert ex.in_flight["math"] == 1

    asyncio.run(run())


def test_an_unload_the_workers_refuse_leaves_the_bank_as_it_was():
    class Refusing(FakeEngine):
        async def collective_rpc(self, method, args=()):
            if method == "t2_unload_experts":
                return [{"error": "RuntimeError: no"}]
            return await super().collective_rpc(method, args)

    async def run():
        ex = make(("math", "code"))
        ex.engine_client = Refusing(["math", "code"])
        with pytest.raises(T2HTTPError, match="t2_unload_experts failed in a worker"):
            await ex.unload("math")
        assert ex.names == ["math", "code"] and ex.parse({"expert": "math"}) == uses("math")
        assert ex.paths["math"] == "math.safetensors"

    asyncio.run(run())


def test_the_server_refuses_several_api_server_processes():
    """Each API server process would hold its own expert list: loads and unloads in one would
    leave the others' names and salts stale."""
    from types import SimpleNamespace

    from t2fast.serve.startup import build_server

    engine = SimpleNamespace(input_processor=SimpleNamespace(
        _t2fast_frontend=FrontEnd(num_layers=4, max_experts=3)))
    with pytest.raises(ValueError, match="2 API server processes"):
        asyncio.run(build_server(engine, SimpleNamespace(api_server_count=2)))
