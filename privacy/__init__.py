"""What genmon keeps about people and for how long: retention, erasure and export by data
subject, and opt-outs from training."""
