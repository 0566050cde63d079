"""Building the server's t2fast state once vLLM's engine is up, and the start-up report."""
from __future__ import annotations

import logging

from ..mixtures import ALPHA_FIELD, profile_name
from .adapt import Adapter
from .config import ServeConfig
from .experts import ServedExperts
from .middleware import T2Server
from .profiles import check_restated, read_profile

logger = logging.getLogger("t2fast.serve")


async def build_server(engine_client, args) -> T2Server | None:
    """The :class:`T2Server` of a t2fast engine (None, with a warning, for another engine).

    Loads ``ServeConfig.named_experts`` and logs what is served: experts, adapted matrices,
    SVD cache hits, the execution path and the adaptation settings.
    """
    from ..vllm.config import config_from_vllm
    from ..vllm.environment import startup_over
    from ..vllm.frontend import expert_file_name, frontend_of

    frontend = frontend_of(engine_client.input_processor)
    if frontend is None:
        logger.warning("t2fast: the served model is not a t2fast model; the t2fast endpoints "
                       "are inactive")
        return None
    servers = getattr(args, "api_server_count", None) or 1
    if servers > 1:      # each would keep its own expert list, and they would drift apart
        raise ValueError(f"t2fast: {servers} API server processes (--api-server-count, or its "
                         f"data-parallel default): the experts' list and the loads and unloads "
                         f"live in one; run one API server (--api-server-count 1)")
    vllm_config = engine_client.vllm_config
    cfg = ServeConfig.from_vllm_config(vllm_config)
    base_names = list(args.served_model_name or [args.model])
    paths = {expert_file_name(p): p for p in config_from_vllm(vllm_config).experts}
    experts = ServedExperts(engine_client, frontend, base_names, paths,
                            cfg.runtime_loading_root)
    for name, path in cfg.named_experts.items():
        await experts.load(name, path)
    for name in experts.names:
        experts.check_name(name)
    if cfg.classifier is not None and cfg.classifier not in experts.names:
        raise ValueError(f"t2fast serve: the classifier {cfg.classifier!r} is not among the "
                         f"loaded experts {experts.names}")
    profiles = {}
    for name, path in cfg.profiles.items():
        alpha, meta = read_profile(path)
        try:
            experts.parse({ALPHA_FIELD: alpha})
            check_restated(meta, cfg.restate)
        except ValueError as exc:
            raise ValueError(f"t2fast serve: profile {name!r} ({path}): {exc}") from None
        profiles[name] = alpha
    if profile_name(cfg.adapt) not in (None, *profiles):
        raise ValueError(f"t2fast serve: --adapt {cfg.adapt}: no such profile; given: "
                         f"{sorted(profiles) or '(none)'}")
    server = T2Server(experts, Adapter(engine_client, cfg.adapt_template, cfg.classifier,
                                       cfg.restate), cfg, profiles)
    log_startup(server, await experts.info(), vllm_config)
    startup_over()
    return server


def log_startup(server: T2Server, info: dict, vllm_config) -> None:
    w = info["workers"][0]
    stats = w["worker_stats"]
    eager = bool(getattr(vllm_config.model_config, "enforce_eager", False))
    path = ("hybrid: dense weights for single-mixture steps, factored SVF otherwise "
            "(answers may depend on the batch)" if w["hybrid"] else
            "factored SVF kernels for every token (batch-independent)")
    logger.info("t2fast: serving %s as %s", vllm_config.model_config.model,
                server.experts.base_names)
    logger.info("t2fast: experts (bank order, capacity %d): %s", info["max_experts"],
                ", ".join(f"{c['id']} <- {server.experts.paths.get(c['id'])}"
                          for c in info["experts"]) or "(none)")
    logger.info("t2fast: %d adapted matrices (%s ... %s); SVDs: %d from cache, %d computed, "
                "%d from rank 0", len(w["targets"]), w["targets"][0] if w["targets"] else "-",
                w["targets"][-1] if w["targets"] else "-", stats["svd_hits"],
                stats["svd_misses"], stats["svd_from_rank0"])
    logger.info("t2fast: path: %s; SVF kernels: %s; %s", path, "/".join(w["kernels"]),
                "eager" if eager else "compiled (torch.compile / CUDA graphs)")
    cfg = server.config
    logger.info("t2fast: default t2_adapt=%s, classifier=%s, template=%s, restate=%s, profiles "
                "%s; run-time loading %s", cfg.adapt, cfg.classifier or "-", cfg.adapt_template,
                cfg.restate, sorted(server.profiles) or "-",
                f"allowed under {server.experts.root}" if cfg.allow_runtime_loading
                else "disabled")
