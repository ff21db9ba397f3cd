#!/bin/sh
# Runs once, when the data directory is created: the role payment-svc serves as. It owns
# nothing; `payment-svc migrate` (as POSTGRES_USER, the owner) grants it its privileges.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v password="$PAYMENT_SVC_DB_PASSWORD" <<'SQL'
CREATE ROLE payment_svc LOGIN PASSWORD :'password';
SQL
