"""``t2fast serve``: vLLM's OpenAI-compatible server with per-request SVF expert mixtures.

* :mod:`.cli` — the ``t2fast serve`` command (vLLM's ``serve`` with t2fast's arguments);
* :mod:`.plugin` — the vLLM endpoint plugin: routes and middleware on vLLM's own app;
* :mod:`.translate` — the request forms (``t2_*`` keys, ``"model": "<expert>"``) and their
  translation for vLLM's routes;
* :mod:`.middleware` — the ASGI middleware applying it; :mod:`.experts` — run-time loading,
  unloading and in-flight use; :mod:`.adapt` — pass 1 of automatic adaptation;
  :mod:`.startup` — the server state and the start-up report; :mod:`.config` — settings.

See the README's "Serving" section and ``docs/vllm.md``.
"""
