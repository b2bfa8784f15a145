"""SlowFast sampling re-derived from the paper (arXiv 2506.10848) and its released LLaDA code
(LiangrunFlora/Slow-Fast-Sampling ``generate_slow_fast_sampling.py``),
one prompt at a time, in plain Python loops, sharing no code with the plugin.

Every forward sees the whole canvas (the reference's truncated fast-phase forwards are its
out-of-span cache, not part of the policy). Forwards that commit nothing (a block finished in
the middle of an exploration stage) are counted separately, because the plugin skips them.
``select_threshold`` replaces the commit rule of both stages by Fast-dLLM's threshold rule, to
check a recipe that swaps SlowFast's select_tokens slot. Mirrored engine rule: the mask token
is never a candidate.
"""

import math

import torch
import torch.nn.functional as F


def slowfast_generate(model, prompt, *, mask_id, gen_length, block_length, variant="code", K=None,
                      tau_min=None, tau_high=None, W=2, stability=1.0, explore_threshold=None,
                      min_parallel=None, select_threshold=None, tail=False, skip_idle=False):
    paper = variant == "paper"
    K = K if K is not None else (8 if paper else 6)
    tau_min = tau_min if tau_min is not None else (0.1 if paper else 0.3)
    tau_high = tau_high if tau_high is not None else (0.85 if paper else 0.9)
    min_parallel = min_parallel if min_parallel is not None else (1 if paper else 2)
    thr_explore = tau_high if explore_threshold is None else explore_threshold

    def over(c, t):
        return c > t if paper else c >= t

    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    P, bl = len(prompt), block_length
    nfe = idle = 0

    def forward(cut=None, cached=None):
        """cut: run the model on x[:, :cut] and take the positions after it from `cached`
        (the out-of-span cache of the reference's fast stage)."""
        logits = model(x if cut is None else x[:, :cut]).clone()
        logits[..., mask_id] = float("-inf")
        x0 = logits[0].argmax(dim=-1)
        p = F.softmax(logits[0].to(torch.float64), dim=-1)
        conf = p.gather(-1, x0[:, None])[:, 0].tolist()
        if cut is not None:
            x0, conf = torch.cat([x0, cached[0][cut:]]), conf + cached[1][cut:]
        return x0, conf

    def masked_in(a, b):
        return [j for j in range(a, b) if int(x[0, j]) == mask_id]

    def commit(x0, conf, cand, threshold, parallel_allowed):
        if select_threshold is not None:
            best = max(cand, key=lambda j: (conf[j], -j))
            chosen = {best} | {j for j in cand if conf[j] >= select_threshold}
        else:
            hi = [j for j in cand if over(conf[j], threshold)]
            if parallel_allowed and len(hi) >= min_parallel:
                chosen = set(hi)
            else:
                chosen = {max(cand, key=lambda j: (conf[j], -j))}
        for j in chosen:
            x[0, j] = x0[j]

    for b in range(gen_length // bl):
        b0, b1 = P + b * bl, P + (b + 1) * bl
        last_len = 0
        while masked_in(b0, b1):
            s = b0 + last_len
            hist, determined, cycle_len = [], False, bl
            for k in range(K):
                if skip_idle and not masked_in(s, b1):
                    break       # the plugin's documented deviation: the next block starts at once
                x0, conf = forward()
                nfe += 1
                cand = masked_in(s, b1)
                if not cand:
                    idle += 1
                    continue
                if not determined:
                    far = [j for j in cand if over(conf[j], tau_min)]
                    inc = max(far) - s + 1 if far else 1
                    hist = (hist + [min(max(last_len + inc, 1), bl)])[-W:]
                    if len(hist) >= W:
                        mean = sum(hist) / len(hist)
                        var = sum((h - mean) ** 2 for h in hist) / len(hist)
                        if paper:
                            if var < stability:
                                cycle_len, determined = int(mean), True
                        elif math.sqrt(var) < stability:
                            cycle_len, determined = hist[-1], True
                        else:
                            cycle_len, determined = int(mean), k == K - 1
                commit(x0, conf, cand, thr_explore, parallel_allowed=not paper)
                if paper and determined:
                    break
            if not determined:
                cycle_len = int(sum(hist) / len(hist)) if hist else bl // 2
            e = b0 + cycle_len
            calls = 0
            while masked_in(s, e):
                calls += 1
                if tail and calls > 1:
                    x0, conf = forward(cut=e, cached=first)
                else:
                    x0, conf = first = forward()
                nfe += 1
                commit(x0, conf, masked_in(s, e), tau_high, parallel_allowed=True)
            last_len = cycle_len
    return x[0, P:].tolist(), nfe - idle
