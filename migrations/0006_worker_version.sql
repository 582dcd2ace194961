-- The skiplock version each worker runs, for `engine health`, the console and mixed-version fleets.
ALTER TABLE skiplock.workers ADD COLUMN version text;
