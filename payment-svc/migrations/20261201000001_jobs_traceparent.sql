-- The W3C traceparent of the request that enqueued a job (NULL when telemetry export was
-- off or nothing was sampled): the job's span links to that trace.
ALTER TABLE jobs ADD COLUMN traceparent text;
