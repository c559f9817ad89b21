"""`localforge run`: the main job as one resumable command, each stage through its job's own code
(extract, teach generate and dcr, teach dataset, finetune, the eval here, export)."""
