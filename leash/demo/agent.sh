# The demo agent: tries a few things an AI agent might, and says what happened.
# Run by `leash demo` under the built-in policy; leash prints each refusal on stderr.
attempt() {
    local what="$1"; shift
    local err
    if err=$( { "$@" >/dev/null; } 2>&1 ); then
        printf '  %-46s allowed\n' "$what"
    else
        printf '  %-46s REFUSED  (%s)\n' "$what" "${err##*: }"
    fi
}
echo "demo agent: pid $$"
attempt "read /etc/hostname"                 cat /etc/hostname
attempt "read /etc/shadow"                   cat /etc/shadow
attempt "write /tmp/leash-demo/notes.txt"    bash -c 'echo notes > /tmp/leash-demo/notes.txt'
attempt "read /tmp/leash-demo/secrets/token" cat /tmp/leash-demo/secrets/token
attempt "write /etc/leash-demo"              bash -c 'echo x > /etc/leash-demo'
attempt "run /usr/bin/id"                    /usr/bin/id
attempt "run /usr/bin/rm"                    /usr/bin/rm -f /tmp/leash-demo/notes.txt
attempt "run a downloaded tool"              /tmp/leash-demo/downloaded-tool
attempt "connect 127.0.0.1:$LEASH_DEMO_PORT" bash -c "exec 3<>/dev/tcp/127.0.0.1/$LEASH_DEMO_PORT"
attempt "connect 192.0.2.1:443"              bash -c 'exec 3<>/dev/tcp/192.0.2.1/443'
