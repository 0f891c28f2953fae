-- One PanDA queue, named by psql variable :queue, as CRIC would describe it (only the
-- fields the server and JEDI read). allow_no_pilot: JEDI's broker sends jobs to it
-- although no pilot has been seen there yet.
INSERT INTO doma_panda.schedconfig_json (panda_queue, data, last_update)
VALUES (:'queue', json_build_object(
    'siteid', :'queue', 'nickname', :'queue', 'panda_resource', :'queue', 'atlas_site', :'queue',
    'status', 'online', 'type', 'unified', 'cloud', 'WORLD', 'vo_name', 'wlcg', 'state', 'ACTIVE',
    'catchall', 'allow_no_pilot', 'corecount', 1, 'maxrss', 0, 'minrss', 0, 'maxtime', 0,
    'mintime', 0, 'maxwdir', 100000, 'capability', 'ucore', 'resource_type', 'SCORE',
    'pledgedcpu', -1, 'harvester', '', 'workflow', 'pull_ups', 'direct_access_lan', false,
    'direct_access_wan', false, 'is_cvmfs', false, 'ddm', '', 'astorages', '{}'::json,
    'copytools', '{}'::json
), now() AT TIME ZONE 'utc')
ON CONFLICT (panda_queue) DO UPDATE SET data = EXCLUDED.data, last_update = EXCLUDED.last_update;
