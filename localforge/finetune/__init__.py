"""Engine-neutral fine-tuning: config, data formats, the hardware planner (trainers live in backends/)."""
