"""Release evaluation, DataComp-style: train a student CLIP from scratch with open_clip's own trainer on a
release (and on equal-size random and whole-pool baselines, at equal compute), then evaluate it zero-shot
with clip_benchmark. Records are versioned and checksummed, keyed by the release id; a leaderboard ranks
every evaluated release next to its baselines."""
