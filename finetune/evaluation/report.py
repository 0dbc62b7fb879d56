"""One evaluation of a trained model: utility, membership inference, PII extraction, canaries, audits.

``evaluate_model`` is model-agnostic: it needs two *scorers* (fine-tuned and base) with
``losses(texts)``, ``log_perplexity(texts)``, ``perplexity(texts)``,
``generate(prompts, max_new_tokens, top_k, seed)`` and ``generation_seconds(prompts, max_new_tokens)``
(``finetune.evaluation.scoring.LMScorer`` implements them for the MindSpore GPT-2). The command line
in ``finetune.evaluate`` loads a run directory and calls it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import audit, canary, membership, pii

NEUTRAL_PROMPTS = (
    "My name is", "Please contact", "You can reach me at", "Her email address is",
    "His phone number is", "The customer", "Dear", "Send the documents to", "I live at",
    "Call me on", "Our new employee", "The account belongs to",
)


@dataclass
class EvalData:
    """Texts and PII of the records the model was trained on (members) and held out (non-members)."""

    members: list
    nonmembers: list
    train_pii: list = field(default_factory=list)  # (kind, value) pairs
    holdout_pii: list = field(default_factory=list)
    known_pii: dict | None = None  # kind -> values the generator can produce (default: both lists)
    exposure_canaries: list = field(default_factory=list)  # canary.Canary inserted in training
    canary_digits: int = 6
    audit_canaries: list = field(default_factory=list)  # texts, each trained on iff audit_included
    audit_included: list = field(default_factory=list)
    # persons (None: the corpus names nobody): one tuple of person ids per member / non-member text
    member_people: list | None = None
    nonmember_people: list | None = None
    member_person_pii: dict | None = None  # person -> normalised PII (pii.person_pii)
    never_seen_person_pii: dict | None = None
    member_persons_all_pii: set | None = None  # PII of records naming only member persons
    never_seen_persons_all_pii: set | None = None
    person_canaries: list = field(default_factory=list)  # canary.Canary, one per person
    person_canary_inserted: list = field(default_factory=list)


def sided_persons(member_people, nonmember_people):
    """``(members, never_seen)``: persons named only in member records and persons named only in
    non-member records, in order of appearance (persons on both sides are neither)."""
    m = dict.fromkeys(x for who in member_people for x in who)
    n = dict.fromkeys(x for who in nonmember_people for x in who)
    return [x for x in m if x not in n], [x for x in n if x not in m]


@dataclass
class EvalOptions:
    n_generate: int = 200
    max_new_tokens: int = 48
    top_k: int = 40
    latency_prompts: int = 8
    latency_new_tokens: int = 32
    latency_repeats: int = 9
    mia_limit: int = 2000
    canary_candidates: int = 2000
    seed: int = 0
    alpha: float = 0.05


def _subsample(texts, limit, rng):
    texts = list(texts)
    if len(texts) <= limit:
        return texts
    idx = np.sort(rng.choice(len(texts), size=limit, replace=False))
    return [texts[i] for i in idx]


def membership_inference(ft, base, members, nonmembers, epsilon, delta, alpha=0.05) -> dict:
    """Both attacks (loss threshold, reference calibrated) with AUC, TPR at 0.1%/1% FPR, DP check."""
    lm, ln = ft.losses(members), ft.losses(nonmembers)
    bm, bn = base.losses(members), base.losses(nonmembers)
    attacks = {
        "loss": (membership.loss_threshold_scores(lm), membership.loss_threshold_scores(ln)),
        "reference": (membership.reference_calibrated_scores(lm, bm),
                      membership.reference_calibrated_scores(ln, bn)),
    }
    out = {"n_members": len(members), "n_nonmembers": len(nonmembers), "attacks": {}, "curves": {}}
    for name, (sm, sn) in attacks.items():
        rep = membership.attack_report(sm, sn, alpha=alpha)
        if epsilon is not None:
            rep["dp_bound"] = membership.dp_bound_check(sm, sn, epsilon, delta, alpha)
        out["attacks"][name] = rep
        fpr, tpr, _ = membership.roc_curve(sm, sn)
        out["curves"][name] = (fpr, tpr)
    return out


NO_PERSON_SPLIT = ("no person-level membership inference: no person is only in the training split "
                   "or none only in the validation split (write the corpus with python -m "
                   "finetune.data --split person)")


def person_membership_inference(ft, base, data: EvalData, opts: EvalOptions, person: dict | None,
                                n_boot: int = 1000) -> dict:
    """Membership inference over persons: members are the persons named only in training records,
    non-members the persons never seen in training. A person's score is the mean (and, as a second
    attack, the minimum) over their records of loss_ref - loss; AUC and TPR at 0.1%/1% FPR with
    bootstrap intervals over persons (``membership.person_attack_report``).

    ``person``: the run's person-level privacy (``epsilon``, ``delta``, ``basis``). The DP limits
    are computed at that epsilon; a significance check against them is made only when ``basis`` is
    ``"person-level"`` (a record-level epsilon says nothing about a person's records)."""
    if data.member_people is None:
        return {"available": False, "note": "the corpus names no persons (no 'people' field)"}
    members, never = sided_persons(data.member_people, data.nonmember_people)
    if not members or not never:
        return {"available": False, "note": NO_PERSON_SPLIT}
    rng = np.random.default_rng(opts.seed + 11)
    members, never = _subsample(members, opts.mia_limit, rng), _subsample(never, opts.mia_limit, rng)
    out = {"available": True, "n_member_persons": len(members), "n_never_seen_persons": len(never),
           "score": "mean (and min) over a person's records of loss_ref - loss",
           "attacks": {}, "curves": {}}
    groups = []
    for side, texts, people, chosen in (
            ("members", data.members, data.member_people, set(members)),
            ("never_seen", data.nonmembers, data.nonmember_people, set(never))):
        rows = [i for i, who in enumerate(people) if set(who) & chosen]
        t = [texts[i] for i in rows]
        sc = membership.reference_calibrated_scores(ft.losses(t), base.losses(t))
        who = [tuple(x for x in people[i] if x in chosen) for i in rows]
        groups.append(membership.person_scores(sc, who))
        out[f"n_records_{side}"] = len(rows)
    (_, m_mean, m_min), (_, n_mean, n_min) = groups
    eps = None if person is None else person.get("epsilon")
    delta = 0.0 if person is None else (person.get("delta") or 0.0)
    checked = eps is not None and person.get("basis") == "person-level"
    for name, (sm, sn) in {"mean": (m_mean, n_mean), "min": (m_min, n_min)}.items():
        rep = membership.person_attack_report(sm, sn, alpha=opts.alpha, n_boot=n_boot,
                                              seed=opts.seed)
        if checked:
            rep["dp_bound"] = membership.dp_bound_check(sm, sn, eps, delta, opts.alpha)
        out["attacks"][name] = rep
        fpr, tpr, _ = membership.roc_curve(sm, sn)
        out["curves"][f"person {name}"] = (fpr, tpr)
    out["dp_limits"] = None if eps is None else membership.dp_bound_values(eps, delta)
    out["dp_limits_basis"] = None if person is None else person.get("basis")
    return out


def _person_pii(data: EvalData, gen_ft, gen_base) -> dict | None:
    """PII extraction of member persons against never-seen persons (``pii.person_extraction``)."""
    if data.member_person_pii is None or not data.member_person_pii or not data.never_seen_person_pii:
        return None
    known = data.known_pii
    if known is None:
        known = {}
        for kind, v in list(data.train_pii) + list(data.holdout_pii):
            known.setdefault(kind, []).append(v)
    matcher = pii.KnownEntityMatcher(known)
    extracted = pii.extract_pii(gen_ft, matcher=matcher) - pii.extract_pii(gen_base, matcher=matcher)
    return pii.person_extraction(extracted, data.member_person_pii, data.never_seen_person_pii,
                                 data.member_persons_all_pii, data.never_seen_persons_all_pii)


def pii_extraction(ft, base, data: EvalData, opts: EvalOptions) -> dict:
    prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(opts.n_generate)]
    gen_ft = ft.generate(prompts, max_new_tokens=opts.max_new_tokens, top_k=opts.top_k, seed=opts.seed)
    gen_base = base.generate(prompts, max_new_tokens=opts.max_new_tokens, top_k=opts.top_k,
                             seed=opts.seed)
    res = pii.extraction_metrics(gen_ft, data.train_pii, gen_base, data.holdout_pii, data.known_pii)
    res["persons"] = _person_pii(data, gen_ft, gen_base)
    res["n_generations"] = len(prompts)
    res["max_new_tokens"] = opts.max_new_tokens
    res["top_k"] = opts.top_k
    return res


def canary_report(ft, base, data: EvalData, opts: EvalOptions, epsilon, delta,
                  note: str | None = None) -> dict:
    """Exposure canaries, the one-run audit and the per-person canaries; with ``note`` (the run
    never trained the exposure and audit canaries) those two are skipped and ``note`` says why."""
    out = {"note": note} if note else {}
    if data.exposure_canaries and not note:
        rng = np.random.default_rng(opts.seed + 7)
        exp = canary.canary_exposures(ft.log_perplexity, data.exposure_canaries, data.canary_digits,
                                      rng, n_candidates=opts.canary_candidates)
        ex = np.array([e["exposure"] for e in exp])
        out["exposure"] = {"k": len(exp), "mean": float(ex.mean()), "max": float(ex.max()),
                           "max_possible": math.log2(canary.space_size(data.canary_digits)),
                           "method": exp[0]["method"], "per_canary": [
                               {"exposure": e["exposure"], "logppl": e["logppl"]} for e in exp]}
    if data.audit_canaries and not note:
        # reference-calibrated membership score: how much fine-tuning lowered each canary's loss
        scores = membership.reference_calibrated_scores(ft.losses(data.audit_canaries),
                                                        base.losses(data.audit_canaries))
        res = audit.one_run_audit(scores, data.audit_included, delta=delta or 0.0, alpha=opts.alpha)
        res["certified_epsilon"] = epsilon
        out["one_run_audit"] = res
    if data.person_canaries and any(data.person_canary_inserted) and not all(data.person_canary_inserted):
        rng = np.random.default_rng(opts.seed + 13)
        exp = canary.canary_exposures(ft.log_perplexity, data.person_canaries, data.canary_digits,
                                      rng, n_candidates=opts.canary_candidates)
        ex = np.array([e["exposure"] for e in exp])
        ins = np.asarray(data.person_canary_inserted, dtype=bool)
        out["person"] = {"n_members": int(ins.sum()), "n_never_seen": int((~ins).sum()),
                         "member_mean": float(ex[ins].mean()), "member_max": float(ex[ins].max()),
                         "never_seen_mean": float(ex[~ins].mean()),
                         "auc": membership.roc_auc(ex[ins], ex[~ins])[0],
                         "max_possible": math.log2(canary.space_size(data.canary_digits)),
                         "method": exp[0]["method"]}
    return out


def utility(ft, base, nonmembers, opts: EvalOptions) -> dict:
    prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(opts.latency_prompts)]
    n = opts.latency_new_tokens
    ft.generation_seconds(prompts, max_new_tokens=n, repeats=1)  # compile both first
    base.generation_seconds(prompts, max_new_tokens=n, repeats=1)
    # interleaved timings (machine load drifts; alternating cancels the drift), fastest of each.
    # Each timed call follows an untimed call of the same model: the first call after switching
    # between two compiled MindSpore graphs is slower, and that cost is not inference latency.
    t_ft, t_base = [], []
    for i in range(opts.latency_repeats):
        order = [(base, t_base), (ft, t_ft)] if i % 2 == 0 else [(ft, t_ft), (base, t_base)]
        for sc, acc in order:
            acc.append(sc.generation_seconds(prompts, max_new_tokens=n, repeats=1, warmup=True))
    t_ft, t_base = min(t_ft), min(t_base)
    return {
        "val_perplexity": ft.perplexity(nonmembers),
        "base_val_perplexity": base.perplexity(nonmembers),
        "generation_seconds_finetuned": t_ft,
        "generation_seconds_base": t_base,
        "inference_latency_ratio": t_ft / t_base,
        "inference_overhead": t_ft / t_base - 1.0,
        "latency_setup": {"prompts": len(prompts), "new_tokens": opts.latency_new_tokens,
                          "decoding": "greedy",
                          "statistic": f"fastest of {opts.latency_repeats} alternating runs, each after an "
                                       "untimed warm-up call of the same model"},
    }


def evaluate_model(ft, base, data: EvalData, opts: EvalOptions, epsilon=None, delta=None,
                   progress=None, person: dict | None = None, canary_note: str | None = None) -> dict:
    """All model-level metrics of one run. ``epsilon`` None means non-private (no DP bound);
    ``person`` is the run's person-level privacy (see ``person_membership_inference``);
    ``canary_note``: why the exposure and audit canaries are not evaluated (the run never trained
    them), reported instead of them."""
    rng = np.random.default_rng(opts.seed)
    members = _subsample(data.members, opts.mia_limit, rng)
    nonmembers = _subsample(data.nonmembers, opts.mia_limit, rng)
    steps = [("utility", lambda: utility(ft, base, nonmembers, opts)),
             ("membership", lambda: membership_inference(ft, base, members, nonmembers, epsilon,
                                                         delta or 0.0, opts.alpha)),
             ("pii", lambda: pii_extraction(ft, base, data, opts)),
             ("canaries", lambda: canary_report(ft, base, data, opts, epsilon, delta, canary_note)),
             ("persons", lambda: person_membership_inference(ft, base, data, opts, person))]
    out = {}
    for name, fn in steps:
        if progress is not None:
            progress.set_postfix_str(name)
        out[name] = fn()
        if progress is not None:
            progress.update(1)
    return out


def summarise(result: dict, run_metrics: dict, epsilon, delta, sampler_audit: dict | None) -> dict:
    """The flat ``summary.json`` dictionary (required keys always present, None when not measured).

    From ``run_metrics`` it takes the run's cost (seconds per step, peak memory) only: statistics of
    the training records (train perplexity, final train loss, mean batch size) are not covered by
    the run's epsilon and stay out of the report (``finetune.evaluate --include-training-stats``
    adds them under a key that says so)."""
    u, mia, p, c = result["utility"], result["membership"], result["pii"], result["canaries"]
    att = mia["attacks"]
    bounded = epsilon is not None and all(a.get("dp_bound") is not None for a in att.values())
    best = max(att, key=lambda k: att[k]["auc"])
    one = c.get("one_run_audit")
    s = {
        "epsilon": epsilon,
        "delta": delta,
        "val_perplexity": u["val_perplexity"],
        "base_val_perplexity": u["base_val_perplexity"],
        "train_seconds_per_step": run_metrics.get("seconds_per_step"),
        "train_peak_rss_mb": run_metrics.get("peak_rss_mb"),
        "inference_overhead": u["inference_overhead"],
        "inference_latency_ratio": u["inference_latency_ratio"],
        "mia_attack": best,
        "mia_auc": att[best]["auc"],
        "mia_auc_ci": att[best]["auc_ci"],
        "mia_tpr_at_1pct_fpr": att[best]["tpr_at_0.01_fpr"]["tpr"],
        "mia_tpr_at_1pct_fpr_ci": [att[best]["tpr_at_0.01_fpr"]["tpr_lower"],
                                   att[best]["tpr_at_0.01_fpr"]["tpr_upper"]],
        "mia_tpr_at_0.1pct_fpr": att[best]["tpr_at_0.001_fpr"]["tpr"],
        "mia_loss_auc": att["loss"]["auc"],
        "mia_reference_auc": att["reference"]["auc"],
        # consistent with TPR <= e^eps FPR + delta at 95% confidence (no significant violation by
        # either attack); the raw empirical excess can be slightly positive from sampling noise
        "mia_inside_dp_bound": (None if not bounded else
                                not any(a["dp_bound"]["significant_violation"] for a in att.values())),
        "mia_dp_bound_max_excess": (None if not bounded else
                                    max(a["dp_bound"]["max_excess"] for a in att.values())),
        "mia_significant_dp_violation": (None if not bounded else
                                         any(a["dp_bound"]["significant_violation"]
                                             for a in att.values())),
        "pii_precision": p["precision"],
        "pii_recall": p["recall"],
        "pii_holdout_recall": p["holdout_recall"],
        "pii_extracted": p["n_extracted"],
        "canary_exposure_mean": c.get("exposure", {}).get("mean"),
        "canary_exposure_max": c.get("exposure", {}).get("max"),
        "audit_epsilon_lower_bound": None if one is None else one["epsilon_lower_bound"],
        "canary_note": c.get("note"),
        "sampler_audit_epsilon_lower_bound": (None if sampler_audit is None
                                              else sampler_audit.get("epsilon_lower_bound")),
        "sampler_certified_epsilon": (None if sampler_audit is None
                                      else sampler_audit.get("certified_epsilon")),
    }
    s.update(_person_summary(result, run_metrics))
    return s


def _person_summary(result: dict, run_metrics: dict) -> dict:
    """The person-level keys of ``summary.json`` (None when not measured)."""
    per, pp = result.get("persons") or {}, result["pii"].get("persons") or {}
    pc = result["canaries"].get("person") or {}
    s = {"person_epsilon": run_metrics.get("person_epsilon"), "person_k": run_metrics.get("person_k"),
         "person_method": run_metrics.get("person_method"),
         "privacy_unit": run_metrics.get("privacy_unit") or "record",
         "record_epsilon": run_metrics.get("record_epsilon", run_metrics.get("epsilon_spent")),
         "person_bound_basis": per.get("dp_limits_basis"), "person_note": per.get("note"),
         "n_member_persons": per.get("n_member_persons"),
         "n_never_seen_persons": per.get("n_never_seen_persons")}
    keys = ("person_mia_attack", "person_mia_auc", "person_mia_auc_ci", "person_mia_tpr_at_1pct_fpr",
            "person_mia_tpr_at_1pct_fpr_ci", "person_mia_tpr_at_0.1pct_fpr", "person_mia_auc_limit",
            "person_mia_tpr_at_1pct_fpr_limit", "person_mia_inside_dp_bound")
    s.update(dict.fromkeys(keys))
    if per.get("available"):
        att = per["attacks"]
        best = max(att, key=lambda k: att[k]["auc"])
        t1 = att[best]["tpr_at_0.01_fpr"]
        lim = per.get("dp_limits") or {}
        checked = [a["dp_bound"]["significant_violation"] for a in att.values() if "dp_bound" in a]
        s.update({"person_mia_attack": best, "person_mia_auc": att[best]["auc"],
                  "person_mia_auc_ci": att[best]["auc_bootstrap_ci"],
                  "person_mia_tpr_at_1pct_fpr": t1["tpr"],
                  "person_mia_tpr_at_1pct_fpr_ci": t1["tpr_bootstrap_ci"],
                  "person_mia_tpr_at_0.1pct_fpr": att[best]["tpr_at_0.001_fpr"]["tpr"],
                  "person_mia_auc_limit": lim.get("auc"),
                  "person_mia_tpr_at_1pct_fpr_limit": lim.get("tpr_at_0.01_fpr"),
                  "person_mia_inside_dp_bound": (not any(checked)) if checked else None})
    s.update({"person_pii_precision": pp.get("precision"), "person_pii_recall": pp.get("recall"),
              "person_pii_never_seen_recall": pp.get("never_seen_recall"),
              "member_persons_exposed": pp.get("member_persons_exposed"),
              "never_seen_persons_exposed": pp.get("never_seen_persons_exposed"),
              "person_canary_exposure_member_mean": pc.get("member_mean"),
              "person_canary_exposure_never_seen_mean": pc.get("never_seen_mean")})
    return s


# ------------------------------------------------------------------------------ for people
GLOSSARY = (
    ("epsilon", "the certified privacy loss the run spent (smaller is more private; with delta, "
                "the failure probability); non-private runs have none"),
    ("base", "the model the run started from (its --model) before fine-tuning on this corpus: "
             "what the model knew without the private records"),
    ("val perplexity", "how well the model predicts held-out records it never trained on "
                       "(lower is better)"),
    ("MIA AUC", "membership inference: 0.5 = an attacker cannot tell training records from "
                "held-out ones, 1.0 = always can; TPR@1%FPR = training records caught when 1% of "
                "held-out ones are wrongly accused"),
    ("inside the DP bound at 95%", "no point of the attack's ROC curve is significantly above "
                                   "TPR = e^eps x FPR + delta (Clopper-Pearson, 95%), the most any "
                                   "(eps, delta)-DP model allows"),
    ("PII precision/recall", "of the names, e-mails, phones and addresses in sampled generations "
                             "(minus those the base model also produces): share that are training "
                             "PII / share of all training PII recovered"),
    ("exposure", "how much more likely the model finds its secret canaries than random ones, in "
                 "bits (about 1 = chance, log2 of the number of possible secrets = memorised)"),
    ("one-run audit", "an empirical lower bound on epsilon from guessing which audit canaries "
                      "were trained on (95% confidence); it must stay below the certified epsilon"),
    ("noise-table audit", "the same kind of lower bound for the noise sampler alone, on two "
                          "neighbouring scalar inputs; it must stay below one release's certificate"),
    ("person-level", "a person in or out of the corpus with all their records (the relation that "
                     "protects a person's PII); person MIA scores a person's records together, "
                     "members are persons in training, non-members persons never seen"),
    ("inference overhead", "generation time of the fine-tuned model (LoRA merged) relative to the "
                           "base model"),
)


def _num(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _rounded(v, digits: int = 4, up: bool = True) -> str:
    """``v`` to ``digits`` significant digits, rounded up (a certified epsilon is never printed
    below its value) or down (an empirical lower bound is never printed above its value)."""
    if v is None:
        return "n/a"
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    k = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    scaled = v * 10 ** k
    r = math.ceil(scaled - 1e-9 * abs(scaled)) if up else math.floor(scaled + 1e-9 * abs(scaled))
    text = f"{r / 10 ** k:.{k}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _at_seq_len(s: dict) -> str:
    """Which sequence length the perplexity was measured at, and what the run itself reported."""
    if s.get("seq_len") is None:
        return ""
    text = f" at seq len {s['seq_len']} ({s.get('seq_len_source', '')}"
    run_ppl, run_len = s.get("run_val_perplexity"), s.get("run_seq_len")
    if run_ppl is not None:
        at = "" if run_len in (None, s["seq_len"]) else f" at seq len {run_len}"
        text += f"; the run reported {_num(run_ppl, '{:.2f}')}{at}"
    return text + ")"


def _person_lines(s: dict) -> list:
    """The person-level lines of the printed summary."""
    if s.get("person_epsilon") is not None:
        k = s.get("person_k")         # None for a unit-level run: its certificate covers any count
        head = (f"  persons   person-level epsilon {_rounded(s['person_epsilon'])} ("
                + ("" if k is None else f"a person in at most {k} records; ") + f"{s.get('person_method')})")
    elif s.get("epsilon") is not None:
        head = "  persons   record-level run: no person-level bound"
    else:
        head = "  persons   non-private run: no bound"
    lines = [head]
    if s.get("person_mia_auc") is None:
        if s.get("person_note"):
            lines.append(f"  persons   {s['person_note']}")
        return lines
    mia = (f"  person MIA AUC {_num(s['person_mia_auc'])} [{_num(s['person_mia_auc_ci'][0])}, "
           f"{_num(s['person_mia_auc_ci'][1])}] ({s['person_mia_attack']} over a person's records, "
           f"{s['n_member_persons']} member vs {s['n_never_seen_persons']} never-seen persons), "
           f"TPR@1%FPR {_num(s['person_mia_tpr_at_1pct_fpr'])}")
    if s.get("person_mia_auc_limit") is not None:
        basis = ("person-level epsilon" if s.get("person_epsilon") is not None
                 else "record-level epsilon, NOT a limit for persons")
        mia += (f"; DP limits at the {basis}: AUC <= {_num(s['person_mia_auc_limit'])}, TPR@1%FPR <= "
                f"{_num(s['person_mia_tpr_at_1pct_fpr_limit'])}")
    if s.get("person_mia_inside_dp_bound") is not None:
        mia += f", inside at 95%: {'yes' if s['person_mia_inside_dp_bound'] else 'NO'}"
    lines.append(mia)
    if s.get("person_pii_precision") is not None:
        lines.append(f"  person PII precision {_num(s['person_pii_precision'])}, recall "
                     f"{_num(s['person_pii_recall'])} of member persons' PII (never-seen persons' "
                     f"recall {_num(s['person_pii_never_seen_recall'])}); persons with PII generated: "
                     f"members {_num(s['member_persons_exposed'])}, never-seen "
                     f"{_num(s['never_seen_persons_exposed'])}")
    if s.get("person_canary_exposure_member_mean") is not None:
        lines.append(f"  person canaries exposure mean: members "
                     f"{_num(s['person_canary_exposure_member_mean'], '{:.2f}')}, never-seen "
                     f"{_num(s['person_canary_exposure_never_seen_mean'], '{:.2f}')} bits")
    return lines


def summary_text(s: dict, out_dir: str | None = None) -> str:
    """The summary printed by ``python -m finetune.evaluate``: numbers rounded for reading, then one
    line per term. ``s`` is the dictionary of ``summarise`` plus ``baselines`` (same keys)."""
    eps = s["epsilon"]
    pct = lambda x: None if x is None else 100.0 * x
    unit = s.get("privacy_unit") or "record"
    lines = [f"epsilon {_rounded(eps)} (delta {_num(s['delta'], '{:g}')})"
             + ("" if eps is not None else " [non-private]")
             + ("" if eps is None or unit == "record" else
                f" per {unit}; record-level epsilon not recorded by the run (no record-level limit below)"
                if s.get("record_epsilon") is None else
                f" per {unit}; record-level epsilon {_rounded(s.get('record_epsilon'))} (one record "
                f"changed inside its {unit}: the MIA bound and the audit below are checked at it)"),
             f"  utility   val perplexity {_num(s['val_perplexity'], '{:.2f}')}{_at_seq_len(s)} (base "
             f"{_num(s['base_val_perplexity'], '{:.2f}')}), "
             f"{_num(s.get('train_seconds_per_step'), '{:.3f}')} s/step, inference overhead "
             f"{_num(pct(s['inference_overhead']), '{:+.1f}')}%"]
    mia = (f"  MIA       AUC {_num(s['mia_auc'])} [{_num(s['mia_auc_ci'][0])}, "
           f"{_num(s['mia_auc_ci'][1])}] ({s['mia_attack']} attack), TPR@1%FPR "
           f"{_num(s['mia_tpr_at_1pct_fpr'])}")
    if s.get("mia_inside_dp_bound") is not None:
        mia += (f", inside the DP bound at 95%: {'yes' if s['mia_inside_dp_bound'] else 'NO'}"
                f" (largest empirical excess {_num(s['mia_dp_bound_max_excess'], '{:+.3f}')})")
    lines.append(mia)
    lines.append(f"  PII       precision {_num(s['pii_precision'])}, recall {_num(s['pii_recall'])} "
                 f"(held-out recall {_num(s['pii_holdout_recall'])}; {s['pii_extracted']} PII strings "
                 f"in the generations)")
    lines += _person_lines(s)
    stats = s.get("training_data_statistics_not_covered_by_epsilon")
    if stats:
        lines.append(f"  training  train perplexity {_num(stats.get('train_perplexity'), '{:.2f}')}: a "
                     "statistic of the training records, NOT covered by the epsilon above")
    if s.get("canary_exposure_max") is not None:
        lines.append(f"  canaries  exposure mean {_num(s['canary_exposure_mean'], '{:.2f}')}, max "
                     f"{_num(s['canary_exposure_max'], '{:.2f}')} bits")
    if s.get("canary_note"):
        lines.append(f"  audit     {s['canary_note']}")
    elif s.get("audit_epsilon_lower_bound") is None:
        lines.append("  audit     n/a: the corpus has no canaries (add them before training with "
                     "python -m finetune.evaluation.prepare)")
    else:
        lines.append(f"  audit     one-run empirical eps >= {_rounded(s['audit_epsilon_lower_bound'], 3, up=False)} "
                     f"(95%), certified {_rounded(s.get('record_epsilon', eps))}")
    if s.get("sampler_audit_epsilon_lower_bound") is not None:
        lines.append(f"  sampler   noise-table audit: empirical eps >= "
                     f"{_rounded(s['sampler_audit_epsilon_lower_bound'], 3, up=False)} (95%), certified for one "
                     f"release {_rounded(s['sampler_certified_epsilon'], 3)}")
    elif s.get("sampler_audit_note"):
        lines.append(f"  sampler   {s['sampler_audit_note']}")
    for name, b in (s.get("baselines") or {}).items():
        be = b.get("epsilon")
        lines.append(f"  baseline {name} ({'eps ' + _rounded(be) if be is not None else 'non-private'}):"
                     f" val perplexity {_num(b['val_perplexity'], '{:.2f}')}, MIA AUC "
                     f"{_num(b['mia_auc'])}, TPR@1%FPR {_num(b['mia_tpr_at_1pct_fpr'])}, PII precision "
                     f"{_num(b['pii_precision'])} recall {_num(b['pii_recall'])}, audit eps >= "
                     f"{_rounded(b['audit_epsilon_lower_bound'], 3, up=False)}")
    lines.append("terms (one line each):")
    width = max(len(t) for t, _ in GLOSSARY)
    lines += [f"  {t:<{width}}  {d}" for t, d in GLOSSARY]
    if out_dir is not None:
        lines.append(f"wrote summary.json, details.json and {len(s.get('plots', {}))} plots to {out_dir}")
    return "\n".join(lines)
