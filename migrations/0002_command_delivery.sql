-- Commands carry their device's id (ids never change; a deleted device's commands
-- are deleted with it), so a command can be shown without a join.
ALTER TABLE commands ADD COLUMN device_id TEXT NOT NULL DEFAULT '';
-- Delivery looks up a device's commands by status: the open ones and the next queued.
CREATE INDEX commands_by_status ON commands (device_pk, status);
