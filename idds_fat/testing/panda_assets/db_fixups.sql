-- Run in database postgres after the schema. pg_cron stores its jobs with nodename ''
-- (the Unix socket in /var/run/postgresql); this cluster's socket is elsewhere, so its
-- jobs connect over TCP loopback instead.
UPDATE cron.job SET nodename = '127.0.0.1' WHERE database = 'panda_db';
