"""Prompt-level routing (the survey's routing mode): train and calibrate the edge's router, run it, report it.

A router (``edge/router.py``) scores each prompt from the SLM alone before generating; prompts scoring
above its threshold go whole to the cloud (``Generate``, cloud-only), the others run hybrid (the
``default`` policy: the SLM drafts, uncertain tokens are verified).

Data, all on the task's training split (never a held-out problem):
- the router is FIT on ``sample_problems(n_train, "train", seed=ROUTER_TRAIN_SEED)``;
- its threshold is CALIBRATED on ``sample_problems(n_cal, "train", seed=CALIBRATION_SEED)``, the same set
  the default's token threshold is calibrated on (``eval/pair.py``; its first problems are those);
- it is MEASURED on ``held_out_problems(n)``.
Labels: a prompt is positive when the hybrid default gets it wrong (``hybrid-wrong``) or, cheaper (no
verifier needed), when SLM-only at the same temperature gets it wrong (``slm-wrong``). Both are fitted and
compared on the calibration set (AUROC against hybrid-wrong, and accuracy at the calibrated threshold).

Threshold rule (``calibrate_threshold``): on the calibration set, with each prompt's hybrid and LLM-only
outcomes (same seeds: the same tokens a routed run would give), predicted routed accuracy at threshold t
= mean over prompts of (LLM-only's outcome if score > t else the hybrid's). Candidate thresholds are
+inf (route nothing), the midpoints between consecutive distinct scores, and -inf (route all); the rule
takes the LARGEST candidate (fewest prompts to the cloud) whose predicted accuracy is >= LLM-only's
accuracy minus ``target`` (default 1 point). Routing all reaches LLM-only's accuracy, so a candidate always
exists; where the hybrid alone is within the target, the rule routes nothing (threshold +inf).
``threshold_at_share`` is the alternative rule: the smallest candidate routing at most a given share.

Logistic regression: a hand-written Newton (IRLS) fit on standardized features with an L2 penalty on the
weights (not the bias); a handful of features, a few hundred prompts: exact to 1e-10 in ~10 steps.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge.client import generate_remote
from edge.hybrid import HybridResult
from edge.router import FEATURE_SETS, FIRST_K_FEATURES, Router, RouterSpec, extract_features, to_cloud
from eval.policies import POLICIES, Policy
from eval.taskeval import CALIBRATION_SEED, ProblemRun, Runner, tokens_digest
from models.task import MAX_SOLUTION_TOKENS, held_out_problems, is_correct, sample_problems

ROUTER_TRAIN_SEED = 4242  # training-split problems the router is fit on (disjoint seed from CALIBRATION_SEED's)
FIRST_K = 4  # tokens the first-k router drafts SLM-only before deciding
ACCURACY_TARGET = 0.01  # the threshold rule: predicted accuracy within 1 point of LLM-only's
L2 = 1.0  # ridge penalty on the standardized weights
LABELS = ("hybrid-wrong", "slm-wrong")


# --- the classifier ----------------------------------------------------------------------------------------

def standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean [F] and scale [F] of ``x`` [M, F]; a constant feature gets scale 1 (z = 0)."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 100,
                 tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """L2-penalized logistic regression of ``y`` [M] in {0, 1} on ``x`` [M, F] by Newton's method on the
    standardized features; returns (mean [F], scale [F], weights [F], bias). The penalty keeps separable
    data finite; the bias is not penalized."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mean, scale = standardization(x)
    z = np.c_[(x - mean) / scale, np.ones(len(x))]  # [M, F+1], the last column is the bias
    penalty = np.full(z.shape[1], float(l2))
    penalty[-1] = 0.0
    theta = np.zeros(z.shape[1])  # [F+1]
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))  # [M]
        grad = z.T @ (p - y) + penalty * theta  # [F+1]
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(z.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < tol:
            break
    return mean, scale, theta[:-1], float(theta[-1])


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve (ties count half); None when one class is absent."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


# --- thresholds --------------------------------------------------------------------------------------------

def candidate_thresholds(scores) -> list[float]:
    """Every distinct routing of ``scores``, from routing nothing to routing all: +inf, the midpoints
    between consecutive distinct scores (descending), -inf."""
    s = np.unique(np.asarray(scores, dtype=float))[::-1]  # distinct, descending
    return [math.inf, *((s[:-1] + s[1:]) / 2).tolist(), -math.inf]


def routed_outcome(scores, threshold: float, local_correct, cloud_correct) -> tuple[float, float]:
    """(accuracy, cloud share) when prompts scoring above ``threshold`` take the cloud's outcome."""
    routed = np.array([to_cloud(s, threshold) for s in scores], dtype=bool)
    correct = np.where(routed, np.asarray(cloud_correct), np.asarray(local_correct))
    return float(correct.mean()), float(routed.mean())


def calibrate_threshold(scores, local_correct, cloud_correct, target: float = ACCURACY_TARGET) -> float:
    """The module docstring's rule: the largest candidate threshold whose routed accuracy is within
    ``target`` of the cloud's (LLM-only's) accuracy."""
    goal = float(np.mean(cloud_correct)) - target
    for t in candidate_thresholds(scores):
        if routed_outcome(scores, t, local_correct, cloud_correct)[0] >= goal - 1e-12:
            return t
    return -math.inf  # unreachable: routing all gives the cloud's accuracy


def threshold_at_share(scores, share: float) -> float:
    """The smallest candidate threshold that routes at most ``share`` of the prompts."""
    best = math.inf
    for t in candidate_thresholds(scores):
        if float(np.mean([to_cloud(s, t) for s in scores])) > share + 1e-12:
            break
        best = t
    return best


# --- data: features and per-prompt outcomes on the training split -----------------------------------------

def default_config(runner: Runner, fits: dict | None, policy: Policy = POLICIES["default"]):
    """The hybrid arm's edge configuration: ``policy`` at its (calibrated) threshold."""
    return policy.config(runner.settings, policy.threshold_from(fits))


def collect_features(runner: Runner, problems, k: int, fits: dict | None) -> dict:
    """Every routing feature of every problem (first-k drafted with seed ``runner.seed + i``, like the run
    that follows), with the cost: {feature: [M]}, plus ``drafted_tokens`` and ``seconds`` per problem."""
    config = default_config(runner, fits)
    out = {name: [] for name in FEATURE_SETS["both"]}
    out.update(drafted_tokens=[], seconds=[])
    for i, problem in enumerate(tqdm(problems, desc="features", unit="problem", leave=False)):
        f = extract_features(runner.model, runner.model.encode(problem.prompt), config, k, runner.seed + i)
        for name, value in f.values.items():
            out[name].append(value)
        out["drafted_tokens"].append(f.drafted_tokens)
        out["seconds"].append(f.seconds)
    return out


def collect_outcomes(runner: Runner, problems, fits: dict | None, names=("default", "llm-only", "slm-only")) -> dict:
    """Per-problem correctness (0/1, same seeds as every run) of each named policy."""
    return {name: runner.policy(POLICIES[name], problems, POLICIES[name].threshold_from(fits))["correct"]
            for name in names}


def feature_matrix(features: dict, kind: str) -> np.ndarray:
    """[M, F] of ``kind``'s features, in FEATURE_SETS order."""
    return np.array([features[name] for name in FEATURE_SETS[kind]], dtype=np.float64).T


def labels_of(outcomes: dict, label: str) -> np.ndarray:
    """1 where the prompt is hard: the hybrid default (``hybrid-wrong``) or SLM-only (``slm-wrong``) failed."""
    source = {"hybrid-wrong": "default", "slm-wrong": "slm-only"}[label]
    return 1 - np.asarray(outcomes[source])


def fit_router(kind: str, features: dict, labels, k: int, l2: float = L2, **meta) -> RouterSpec:
    """A logistic router of ``kind`` fitted to ``labels`` [M]; threshold +inf until calibrated."""
    if len(set(np.asarray(labels).tolist())) < 2:
        raise ValueError(f"{meta.get('label', 'the')} labels hold one class only: fit the router on more problems")
    mean, scale, weights, bias = fit_logistic(feature_matrix(features, kind), labels, l2)
    uses_drafts = any(f in FIRST_K_FEATURES for f in FEATURE_SETS[kind])
    return RouterSpec(kind, k if uses_drafts else 0, tuple(mean.tolist()), tuple(scale.tolist()),
                      tuple(weights.tolist()), bias, math.inf, dict(meta, l2=l2))


def scores_of(spec: RouterSpec, features: dict) -> list[float]:
    """The router's score of every problem whose features are in ``features``."""
    m = len(features[FEATURE_SETS["both"][0]])
    return [spec.score_values({f: features[f][i] for f in spec.features}) for i in range(m)]


# --- the routed run ----------------------------------------------------------------------------------------

def _cloud_run(runner: Runner, problem, seed: int) -> ProblemRun:
    """One problem generated by the cloud (Generate) exactly as ``Runner.llm_only`` runs it (seed included),
    as a ProblemRun whose HybridResult holds no records (nothing was drafted)."""
    prompt_ids = runner.model.encode(problem.prompt)
    t0 = time.perf_counter()
    ids, up, down = generate_remote(runner.channel, runner.model.manifest.fingerprint, prompt_ids, runner.settings,
                                    MAX_SOLUTION_TOKENS, sorted(runner.model.eos_ids), seed=seed)
    seconds = time.perf_counter() - t0
    result = HybridResult(prompt_ids, token_ids=list(ids), text=runner.model.decode(ids), uplink_bytes=up,
                          downlink_bytes=down, seconds=seconds)
    return ProblemRun(problem, result, seconds)


def run_routed(runner: Runner, problems, router: Router | None, threshold: float, fits: dict | None,
               policy: Policy = POLICIES["default"], name: str = "routed") -> dict:
    """One report row: each problem scored by ``router`` and sent whole to Generate when score > threshold,
    else run hybrid with ``policy`` (default) at its threshold from ``fits``. Problem i uses seed
    ``runner.seed + i`` in both arms, so a problem gets exactly the tokens ``default`` or ``llm-only`` give it.

    With threshold +inf or -inf the decision does not depend on the score and the router is not run (nor
    needed: ``router`` may be None): +inf is the hybrid policy alone, -inf is LLM-only. Otherwise the
    routing features' cost (the prefill and the drafted tokens, thrown away) counts in tokens/s.
    """
    scoring = math.isfinite(threshold)
    if scoring and router is None:
        raise ValueError("a finite routing threshold needs a router")
    config = default_config(runner, fits, policy)
    runs, routed, drafted, routing_s = [], [], 0, 0.0
    for i, problem in enumerate(tqdm(problems, desc=name, unit="problem", leave=False)):
        seed = runner.seed + i
        cloud = threshold == -math.inf
        if scoring:
            cloud = to_cloud(router.score(runner.model.encode(problem.prompt), seed), threshold)
            drafted, routing_s = drafted + router.last.drafted_tokens, routing_s + router.last.seconds
        routed.append(int(cloud))
        runs.append(_cloud_run(runner, problem, seed) if cloud else
                    runner.hybrid(name, config, [problem], first_index=i, progress=False)[0])
    return routed_row(name, runs, routed, drafted, routing_s)


def routed_row(name: str, runs: list[ProblemRun], routed: list[int], drafted: int, routing_s: float) -> dict:
    """The report quantities (``taskeval.summarize``'s names) over hybrid and cloud-generated problems: a
    cloud problem's every token counts as sent and as the LLM's, with one round trip per problem (as
    ``Runner.llm_only`` counts them)."""
    tokens = sum(len(run.result.token_ids) for run in runs)
    records = [r for run in runs for r in run.result.records]
    sent = [r for r in records if r.sent]
    cloud_tokens = sum(len(run.result.token_ids) for run, c in zip(runs, routed) if c)
    llm_tokens = cloud_tokens + sum(not r.accepted for r in sent)
    trips = sum(routed) + sum(run.result.round_trips for run, c in zip(runs, routed) if not c)
    correct = [int(is_correct(run.problem, run.result.text)) for run in runs]
    return {
        "config": name,
        "accuracy": sum(correct) / len(runs),
        "transmission_rate": (len(sent) + cloud_tokens) / tokens,
        "acceptance_rate": sum(bool(r.accepted) for r in sent) / len(sent) if sent else None,
        "llm_token_share": llm_tokens / tokens,
        "round_trips_per_token": trips / tokens,
        "uplink_bytes_per_token": sum(run.result.uplink_bytes for run in runs) / tokens,
        "downlink_bytes_per_token": sum(run.result.downlink_bytes for run in runs) / tokens,
        "tokens_per_s": tokens / (sum(run.result.seconds for run in runs) + routing_s),
        "tokens_digest": tokens_digest(runs),
        "correct": correct,
        "cloud_share": sum(routed) / len(runs),
        "routed": routed,  # per problem: 1 = sent to Generate
        "llm_tokens_generated": llm_tokens,
        "llm_tokens_per_problem": llm_tokens / len(runs),
        "tokens": tokens,
        "routing_drafted_tokens": drafted,  # SLM tokens drafted for the first-k features and thrown away
        "routing_seconds": routing_s,
    }


# --- the modes table's row --------------------------------------------------------------------------------

ROUTERS = Path("reports")  # where each temperature's default router is kept (router-T<t>.json)
TRAIN_PROBLEMS, CALIBRATION_PROBLEMS = 300, 200  # python -m eval route's defaults


def router_path(folder: Path, temperature: float) -> Path:
    return Path(folder) / f"router-T{temperature:g}.json"


def ensure_router(runner: Runner, fits: dict, folder: Path = ROUTERS) -> RouterSpec:
    """The default router at the runner's temperature: read from ``folder`` (``python -m eval route`` writes it),
    else trained and calibrated here with that command's defaults and saved there."""
    from edge.router import load_router, save_router

    path = router_path(folder, runner.settings.temperature)
    if path.is_file():
        return load_router(path)
    print(f"training the prompt router at T={runner.settings.temperature:g} ({TRAIN_PROBLEMS} + "
          f"{CALIBRATION_PROBLEMS} training-split problems) -> {path}", flush=True)
    trained = train_routers(runner, fits, TRAIN_PROBLEMS, CALIBRATION_PROBLEMS)
    spec = trained["routers"][trained["default"]]
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_router(path, spec)
    return spec


def routed_policy_row(runner: Runner, problems, fits: dict, folder: Path = ROUTERS) -> dict:
    """The ``routed`` policy's row: the default router (``ensure_router``) in front of ``default``."""
    spec = ensure_router(runner, fits, folder)
    router = Router(runner.model, spec, default_config(runner, fits)) if math.isfinite(spec.threshold) else None
    return {**run_routed(runner, problems, router, spec.threshold, fits), "router_threshold": spec.threshold,
            "router": spec.kind, "router_label": spec.meta.get("label")}


# --- the experiment ----------------------------------------------------------------------------------------

def train_routers(runner: Runner, fits: dict, n_train: int, n_cal: int, k: int = FIRST_K,
                  target: float = ACCURACY_TARGET) -> dict:
    """Fit every router kind on each label (training problems), calibrate each threshold (calibration
    problems), and pick the default router: the highest AUROC against hybrid-wrong on the calibration set,
    ties to the lower calibrated cloud share. Returns the routers and the evidence."""
    train = sample_problems(n_train, "train", seed=ROUTER_TRAIN_SEED)
    cal = sample_problems(n_cal, "train", seed=CALIBRATION_SEED)
    f_train, o_train = collect_features(runner, train, k, fits), collect_outcomes(runner, train, fits)
    f_cal, o_cal = collect_features(runner, cal, k, fits), collect_outcomes(runner, cal, fits, ("default", "llm-only"))
    hard_cal = labels_of(o_cal, "hybrid-wrong")
    routers, evidence = {}, []
    for kind in FEATURE_SETS:
        for label in LABELS:
            try:
                spec = fit_router(kind, f_train, labels_of(o_train, label), k, label=label,
                                  train_seed=ROUTER_TRAIN_SEED, n_train=n_train,
                                  train_positive_share=float(labels_of(o_train, label).mean()))
            except ValueError as exc:
                evidence.append({"router": kind, "label": label, "skipped": str(exc)})
                continue
            s = scores_of(spec, f_cal)
            t = calibrate_threshold(s, o_cal["default"], o_cal["llm-only"], target)
            acc, share = routed_outcome(s, t, o_cal["default"], o_cal["llm-only"])
            spec = spec.with_threshold(t, calibration_seed=CALIBRATION_SEED, n_calibration=n_cal, target=target,
                                       calibration_accuracy=acc, calibration_cloud_share=share)
            routers[f"{kind}/{label}"] = spec
            evidence.append({"router": kind, "label": label, "train_auroc": auroc(scores_of(spec, f_train),
                                                                                  labels_of(o_train, label)),
                             "cal_auroc_hybrid_wrong": auroc(s, hard_cal), "threshold": t,
                             "cal_accuracy": acc, "cal_cloud_share": share})
    fitted = [e for e in evidence if "skipped" not in e]
    best = max(fitted, key=lambda e: (e["cal_auroc_hybrid_wrong"] or 0.0, -e["cal_cloud_share"]))
    return {"routers": routers, "evidence": evidence, "default": f"{best['router']}/{best['label']}",
            "calibration": {"llm_only_accuracy": float(np.mean(o_cal["llm-only"])),
                            "default_accuracy": float(np.mean(o_cal["default"])), "problems": n_cal},
            "train": {"default_accuracy": float(np.mean(o_train["default"])),
                      "slm_only_accuracy": float(np.mean(o_train["slm-only"])), "problems": n_train},
            "routing_cost": {"mean_seconds_k0_and_k": float(np.mean(f_cal["seconds"])),
                             "mean_drafted_tokens": float(np.mean(f_cal["drafted_tokens"]))}}


def _brief(row: dict) -> dict:
    """A row without its per-problem lists (they stay in the JSON only where a comparison needs them)."""
    return {k: v for k, v in row.items() if k not in ("correct", "routed")}


def equal_accuracy(held: dict, scores: dict, token_sweep: list[dict], routed_rows: dict) -> dict:
    """The two "at equal accuracy" comparisons on the held-out problems: (a) each router at the threshold whose
    routed accuracy first reaches the default's (an oracle choice, on test data: labelled so); (b) the
    default at the largest swept token threshold whose accuracy reaches each routed row's."""
    dflt, llm = held["default"]["correct"], held["llm-only"]["correct"]
    target = float(np.mean(dflt))
    out = {"routers_matching_default": {}, "default_matching_routed": {}}
    for key, s in scores.items():
        for t in candidate_thresholds(s):
            acc, share = routed_outcome(s, t, dflt, llm)
            if acc >= target - 1e-12:
                out["routers_matching_default"][key] = {"threshold": t, "accuracy": acc, "cloud_share": share}
                break
    for key, row in routed_rows.items():
        ok = [r for r in token_sweep if r["accuracy"] >= row["accuracy"] - 1e-12]
        out["default_matching_routed"][key] = (max(ok, key=lambda r: r["token_threshold"]) if ok else None)
    return out


def measure_temperature(runner: Runner, fits: dict, n_train: int, n_cal: int, n_test: int, k: int,
                        token_thresholds: tuple[float, ...], target: float = ACCURACY_TARGET) -> dict:
    """Train, calibrate and measure every router at the runner's temperature against default and LLM-only."""
    trained = train_routers(runner, fits, n_train, n_cal, k, target)
    problems = held_out_problems(n_test)
    held = {"default": run_routed(runner, problems, None, math.inf, fits, name="default"),
            "llm-only": run_routed(runner, problems, None, -math.inf, fits, name="llm-only")}
    # the routed run's hybrid arm must give exactly Runner.policy's default tokens (same seeds)
    policy_default = runner.policy(POLICIES["default"], problems, POLICIES["default"].threshold_from(fits))
    f_test = collect_features(runner, problems, k, fits)
    config = default_config(runner, fits)
    scores, routed_rows = {}, {}
    for key, spec in trained["routers"].items():
        scores[key] = scores_of(spec, f_test)
        if spec.meta["label"] == "slm-wrong" or key == trained["default"]:  # one real run per kind, and the default
            row = run_routed(runner, problems, Router(runner.model, spec, config), spec.threshold, fits,
                             name=f"routed[{key}]")
            predicted = routed_outcome(scores[key], spec.threshold, held["default"]["correct"],
                                       held["llm-only"]["correct"])
            routed_rows[key] = {**row, "predicted_accuracy": predicted[0], "predicted_cloud_share": predicted[1],
                                "threshold": spec.threshold, "router": spec.kind, "label": spec.meta["label"]}
    sweep = []  # only thresholds below the default's can raise its accuracy toward a routed row's
    for u in (u for u in token_thresholds if u < POLICIES["default"].threshold_from(fits)):
        row = run_routed(runner, problems, None, math.inf, fits, policy=POLICIES["default"].at(u), name=f"default@{u:g}")
        sweep.append({**_brief(row), "token_threshold": u})
    shares = {}
    for key, s in scores.items():  # the alternative rule, offline (same seeds: exact outcomes)
        for share in (0.1, 0.2, 0.3):
            t = threshold_at_share(s, share)
            acc, got = routed_outcome(s, t, held["default"]["correct"], held["llm-only"]["correct"])
            shares.setdefault(key, []).append({"share_cap": share, "threshold": t, "accuracy": acc, "cloud_share": got})
    return {
        "temperature": runner.settings.temperature,
        "token_threshold": POLICIES["default"].threshold_from(fits),
        "routers": {key: {"kind": s.kind, "k": s.k, "features": list(s.features), "mean": s.mean, "scale": s.scale,
                          "weights": s.weights, "bias": s.bias, "threshold": s.threshold, "meta": s.meta}
                    for key, s in trained["routers"].items()},
        "evidence": trained["evidence"], "default_router": trained["default"],
        "calibration": trained["calibration"], "train": trained["train"], "routing_cost": trained["routing_cost"],
        "held_out": {"default": _brief(held["default"]), "llm-only": _brief(held["llm-only"]),
                     **{f"routed[{k_}]": _brief(r) for k_, r in routed_rows.items()}},
        "default_digest_matches_runner_policy": policy_default["tokens_digest"] == held["default"]["tokens_digest"],
        "held_out_auroc_hybrid_wrong": {key: auroc(s, 1 - np.asarray(held["default"]["correct"]))
                                        for key, s in scores.items()},
        "held_out_share_rule": shares,
        "default_token_sweep": sweep,
        "equal_accuracy": equal_accuracy(held, scores, sweep, routed_rows),
    }


def run_routing_report(runner_for, temperatures, n_train: int, n_cal: int, n_test: int, n_token_cal: int,
                       k: int, token_thresholds: tuple[float, ...], out: Path, command: str) -> dict:
    """Every temperature's section (``runner_for(temperature)``: a Runner of the demo SLM, as
    ``eval.modes.modes_runners`` gives), written to ``out`` (JSON) with each temperature's default router saved
    next to it as ``router-T<t>.json`` (loadable with ``edge.router.load_router``)."""
    from edge.calibration import save_calibration  # the project's JSON writer (infinities as strings)
    from edge.router import save_router
    from eval.pair import calibrate

    load_before = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    for t in temperatures:
        runner = runner_for(t)
        fits = calibrate(runner, n_token_cal)
        section = measure_temperature(runner, fits, n_train, n_cal, n_test, k, token_thresholds)
        spec = section["routers"][section["default_router"]]
        path = out.parent / f"router-T{t:g}.json"
        save_router(path, RouterSpec(spec["kind"], spec["k"], spec["mean"], spec["scale"], spec["weights"],
                                     spec["bias"], spec["threshold"], spec["meta"]))
        section["default_router_file"] = str(path)
        sections.append(section)
    report = {"command": command, "seed": runner.seed, "first_k": k, "accuracy_target": ACCURACY_TARGET,
              "train_seed": ROUTER_TRAIN_SEED, "calibration_seed": CALIBRATION_SEED, "problems": n_test,
              "sections": sections, "load_average": {"before": load_before, "after": list(os.getloadavg())}}
    save_calibration(out, report)
    return report


def format_report(report: dict) -> str:
    """The held-out rows of every temperature, one line each."""
    head = (f"{'T':>3} {'row':<30} {'accuracy':>8} {'cloud':>6} {'TR':>6} {'up B/tok':>8} {'LLM tok/prob':>12} "
            f"{'tok/s':>7} {'drafted':>7}")
    lines = [head, "-" * len(head)]
    for s in report["sections"]:
        for name, r in s["held_out"].items():
            lines.append(f"{s['temperature']:>3g} {name:<30} {r['accuracy']:>8.3f} {r['cloud_share']:>6.3f} "
                         f"{r['transmission_rate']:>6.3f} {r['uplink_bytes_per_token']:>8.2f} "
                         f"{r['llm_tokens_per_problem']:>12.2f} {r['tokens_per_s']:>7.1f} {r['routing_drafted_tokens']:>7}")
        lines.append(f"    default router at T={s['temperature']:g}: {s['default_router']} ({s['default_router_file']})")
    return "\n".join(lines)
