-- Tell notifiers when a project's webhook subscriptions may have changed (payload: the project id), so
-- they can cache which event types a project's endpoints want and skip events nobody subscribed to.
-- Only changes that matter for matching notify: not the failure bookkeeping of every attempt.

CREATE OR REPLACE FUNCTION threadline_webhook_endpoints_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('threadline_webhook_endpoints', OLD.project_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('threadline_webhook_endpoints', NEW.project_id);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS webhook_endpoints_changed ON webhook_endpoints;
CREATE TRIGGER webhook_endpoints_changed
    AFTER INSERT OR DELETE OR UPDATE OF project_id, status, event_types, created_ts ON webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION threadline_webhook_endpoints_changed();
