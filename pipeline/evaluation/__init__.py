"""Evaluation: did alignment work, and is the win real?

    evaluate.py   the one entry (`evaluate_policies`): sample every policy at each temperature, judge,
                  compare with SFT, guards, verdict; the table and the manifest's headline numbers
    guards.py     the reward-hacking guards as pure functions (repetition, one phrase everywhere,
                  fluency under a bigram model of human text, KL budget, real words, distinct-2)
    judges.py     VADER, `module:callable` and reward-model judges; paired win rate
    sampling.py   generation, KL to the reference, and the one reward-model scoring function
    rundir.py     `rlhf eval` and the end of `rlhf run`: results.json, the terminal, W&B

The PPO stage calls `evaluate_policies` on its final checkpoint; `rlhf run` reuses that result
when nothing differs, and `rlhf eval` always regenerates.
"""
