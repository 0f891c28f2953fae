-- Run in panda_db after the schema. JEDI joins JEDI_Tasks with JEDI_AUX_Status_MinTaskID,
-- which pg_cron refreshes each minute; a status without a row there hides its tasks from
-- JEDI until then. Seeding every status with 0 lets a fresh database react at once.
INSERT INTO doma_panda.jedi_aux_status_mintaskid (status, min_jeditaskid)
SELECT s, 0 FROM unnest(ARRAY[
    'registered', 'defined', 'assigning', 'ready', 'pending', 'scouting', 'scouted', 'running',
    'prepared', 'done', 'failed', 'finished', 'aborting', 'aborted', 'finishing', 'topreprocess',
    'preprocessing', 'tobroken', 'broken', 'toretry', 'toincexec', 'rerefine', 'paused',
    'throttled', 'exhausted', 'passed', 'toabort'
]) AS s
ON CONFLICT (status) DO NOTHING;
