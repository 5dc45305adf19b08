"""What a run reports: :mod:`.reporter` (one object per run: events, speed, kurtosis, console),
:mod:`.writer` (TensorBoard events and the console), :mod:`.throughput` (tokens/s, MFU),
:mod:`.kurtosis` (the early warning), :mod:`.divergence` (loss and grad-norm spikes)."""
