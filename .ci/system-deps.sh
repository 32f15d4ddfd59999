#!/usr/bin/env bash
# Make sure PostgreSQL server binaries and PgBouncer are on this machine.
# Installs Debian's packages when they are missing and we are root; otherwise fails loudly.
set -euo pipefail

have_pg() {
  command -v pg_ctl >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null 2>&1
}
have_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}

missing=()
have_pg || missing+=(postgresql)
have_pgbouncer || missing+=(pgbouncer)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Don't let the packages start their own services: the test suite starts its own servers.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f "$policy"
  have_pg && have_pgbouncer && exit 0
fi

echo "system-deps: missing ${missing[*]}." >&2
echo "  Install them (Debian/Ubuntu: sudo apt-get install postgresql pgbouncer)," >&2
echo "  or point SQLALCHEMY_SCALE_PG_BINDIR / SQLALCHEMY_SCALE_PGBOUNCER at them." >&2
exit 1
