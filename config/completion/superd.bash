# bash completion for superd(8): commands, options, files, and the names of the services of
# the running daemon (from `superd status --json`, through the control socket of the table
# given with -c, else of the default table). Installed by the Debian package as
# /usr/share/bash-completion/completions/superd; from a checkout:
#     source config/completion/superd.bash

# The -c/--config value typed so far, if any.
_superd_config()
{
    local i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            -c | --config) printf '%s' "${COMP_WORDS[i + 1]}"; return ;;
            --config=*) printf '%s' "${COMP_WORDS[i]#--config=}"; return ;;
        esac
    done
}

# The running daemon's service names, one a line; nothing when no daemon answers.
_superd_services()
{
    local config args=()
    config=$(_superd_config)
    [[ -n $config ]] && args=(-c "$config")
    superd status "${args[@]}" --json 2>/dev/null |
        python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["services"]))' \
            2>/dev/null
}

_superd_files()
{
    local IFS=$'\n'
    COMPREPLY=($(compgen -f -- "$1"))
    compopt -o filenames 2>/dev/null
}

_superd()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    local command="" i positional=0
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            -c | --config | --pidfile) ((i++)) ;;
            -*) ;;
            *) if [[ -z $command ]]; then command=${COMP_WORDS[i]}; else ((positional++)); fi ;;
        esac
    done
    case $prev in
        -c | --config | --pidfile | --split) _superd_files "$cur"; return ;;
        --flavour) COMPREPLY=($(compgen -W "debian freebsd openbsd inetutils" -- "$cur"))
            return ;;
    esac
    local options
    case $command in
        "") options="--help --version"
            if [[ $cur != -* ]]; then
                COMPREPLY=($(compgen -W "run check status reload stop upgrade import" -- "$cur"))
                return
            fi ;;
        run) options="--config --daemon --pidfile --help" ;;
        check) options="--config --bind --help" ;;
        reload | stop | upgrade) options="--config --help" ;;
        status) options="--config --json --help"
            if [[ $cur != -* ]]; then
                local IFS=$'\n'
                COMPREPLY=($(compgen -W "$(_superd_services)" -- "$cur"))
                return
            fi ;;
        import) options="--check --flavour --split --help"
            if [[ $cur != -* ]]; then
                if ((positional == 0)); then
                    COMPREPLY=($(compgen -W "inetd xinetd systemd tcprules" -- "$cur"))
                else
                    _superd_files "$cur"
                fi
                return
            fi ;;
        *) return ;;
    esac
    COMPREPLY=($(compgen -W "$options" -- "$cur"))
}

complete -F _superd superd
