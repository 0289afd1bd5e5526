#!/bin/sh
# The board's half of Kiln's serial protocol (see hil/transport/serial.py for the host's half).
# SerialTransport sends these functions to the board's console shell on open; lines that start
# with '#' and indentation are stripped first. POSIX sh + coreutils only: dash, bash and busybox
# ash all run it. Every variable is a global of the console shell (POSIX has no `local`), hence
# the kiln_ prefix. Never read frames with the shell's `read`: on a raw tty bash reads past the
# line (it buffers unless the fd is a pipe), so the receiver uses `head -c` only.

kiln_nl='
'

# kiln_num N...: true if every N is a decimal number without a leading zero (so that a damaged
# field can neither abort shell arithmetic, which would end the receiver, nor be octal)
kiln_num() { for kiln_v; do case $kiln_v in ''|*[!0-9]*|0?*) return 1;; esac; done; }

# kiln_do NONCE CRC LEN BASE64: eval a host script if it arrived intact, once per nonce; a
# repeated nonce (the host did not see our ACK) only re-sends the result.
kiln_do() {
  if [ "$1" = "${kiln_last-}" ]; then printf 'KILN ACK %s\n' "$1"; kiln_get "$1"; return; fi
  if [ "$(printf %s "$4" | base64 -d 2>/dev/null | cksum)" != "$2 $3" ]; then printf 'KILN NAK %s\n' "$1"; return; fi
  kiln_last=$1
  printf 'KILN ACK %s\n' "$1"
  eval "$(printf %s "$4" | base64 -d)"
}

# kiln_job NONCE SECS DIR ARGV...: run ARGV in DIR in the background (stdin /dev/null, output in
# files) under a watchdog that TERMs, then KILLs its process group after SECS; print the result.
# SIGINT is ignored meanwhile: the host's ^C (sent before a line it re-sends) must not abort the
# wait. The braces' 2>/dev/null hides the shell's job notices ("[1] 1234", "Terminated").
kiln_job() {
  trap '' INT
  kiln_n=$1 kiln_t=$2 kiln_c=$3; shift 3
  rm -f "$kiln_d/o" "$kiln_d/e" "$kiln_d/r" "$kiln_d/t" "$kiln_d/x"
  printf '%s\n' "$kiln_n" > "$kiln_d/n"
  {
    ( cd "$kiln_c" 2>/dev/null || { : > "$kiln_d/x"; exit 126; }; exec "$@" ) </dev/null >"$kiln_d/o" 2>"$kiln_d/e" &
    kiln_p=$!
    ( sleep "$kiln_t"; : > "$kiln_d/t"; kill -TERM -"$kiln_p" || kill -TERM "$kiln_p"; sleep 1
      kill -KILL -"$kiln_p" || kill -KILL "$kiln_p" ) </dev/null >/dev/null 2>&1 &
    kiln_w=$!
    wait "$kiln_p"; kiln_r=$?
    kill -KILL -"$kiln_w" || kill -KILL "$kiln_w"
  } 2>/dev/null
  printf '%s\n' "$kiln_r" > "$kiln_d/r"
  kiln_get "$kiln_n"
  trap - INT
}

# kiln_get NONCE: print the last job's result: a header (exit code, flag t=timed out / x=no such
# dir, cksums of stdout and stderr) with its own cksum, then stdout and stderr in base64.
kiln_get() {
  if [ "$(cat "$kiln_d/n" 2>/dev/null)" != "$1" ] || [ ! -f "$kiln_d/r" ]; then printf 'KILN R %s lost\n' "$1"; return; fi
  kiln_g=-; [ -f "$kiln_d/x" ] && kiln_g=x; [ -f "$kiln_d/t" ] && kiln_g=t
  kiln_s="$(cat "$kiln_d/r") $kiln_g $(cksum < "$kiln_d/o") $(cksum < "$kiln_d/e")"
  printf 'KILN R %s %s %s\n' "$1" "$kiln_s" "$(printf %s "$kiln_s" | cksum)"
  base64 < "$kiln_d/o"; printf 'KILN E %s\n' "$1"; base64 < "$kiln_d/e"; printf 'KILN Z %s\n' "$1"
}

# kiln_rx NONCE DEST VTIME IDLE: receive frames into DEST.part until the host sends a line for
# the shell (then eval it) or the line stays idle IDLE times VTIME/10 s. The tty is made
# `-isig min 0 time VTIME` so that a read returns empty after that much silence: a frame that
# lost bytes ends instead of hanging (ignoreeof: should we die here, that empty read at the
# prompt must not log the shell out). Every answer carries the bytes stored so far.
kiln_rx() {
  kiln_rn=$1 kiln_rf=$2 kiln_rv=$3 kiln_rl=$4 kiln_ro=0 kiln_ri=0
  if ! { mkdir -p "${kiln_rf%/*}" && : > "$kiln_rf.part"; } 2>"$kiln_d/e"; then
    printf 'KILN D %s fail %s\n' "$kiln_rn" "$(head -c 300 "$kiln_d/e" | tr '\n' ' ')"; return
  fi
  set -o ignoreeof 2>/dev/null; stty -isig min 0 time "$kiln_rv"
  printf 'KILN A %s 0\n' "$kiln_rn"
  while [ "$kiln_ri" -lt "$kiln_rl" ]; do
    # a header is 64 bytes; skip the newlines that pad the frame before it
    kiln_h=$(head -c 64)
    while kiln_p=${kiln_h%%[!"$kiln_nl"]*}; [ -n "$kiln_p" ]; do
      kiln_h=${kiln_h#"$kiln_p"}$(head -c ${#kiln_p})
    done
    case ${#kiln_h}$kiln_h in
    "63: F $kiln_rn "*)
      # ": F NONCE OFFSET LEN CHECK B64LEN", then the base64 line; CHECK is the line's cksum
      # xor a mix of OFFSET and LEN, so that a damaged header fails too
      kiln_ri=0
      set -f; set -- $kiln_h; set +f
      if [ $# -ne 7 ] || ! kiln_num "$4" "$5" "$6" "$7" || [ ${#4} -gt 15 ] || [ ${#5} -gt 6 ] || [ ${#6} -gt 10 ] || [ ${#7} -gt 6 ]; then
        cat > /dev/null; printf 'KILN N %s %s header\n' "$kiln_rn" "$kiln_ro"; continue
      fi
      head -c "$(($7 + 1))" > "$kiln_d/f"
      if [ "$4" -lt "$kiln_ro" ]; then printf 'KILN A %s %s\n' "$kiln_rn" "$kiln_ro"; continue; fi
      if [ "$4" -gt "$kiln_ro" ]; then printf 'KILN N %s %s offset\n' "$kiln_rn" "$kiln_ro"; continue; fi
      if [ "$(cksum < "$kiln_d/f")" != "$(($6 ^ (($4 + $5 * 65536) % 4294967296))) $(($7 + 1))" ]; then
        printf 'KILN N %s %s checksum\n' "$kiln_rn" "$kiln_ro"; continue
      fi
      if ! base64 -d < "$kiln_d/f" >> "$kiln_rf.part" 2>"$kiln_d/e"; then
        printf 'KILN D %s fail %s\n' "$kiln_rn" "$(head -c 300 "$kiln_d/e" | tr '\n' ' ')"; break
      fi
      kiln_ro=$((kiln_ro + $5)); printf 'KILN A %s %s\n' "$kiln_rn" "$kiln_ro" ;;
    "63: E $kiln_rn "*)
      kiln_ri=0; kiln_x=$(sha256sum < "$kiln_rf.part")
      printf 'KILN D %s ok %s %s\n' "$kiln_rn" "$kiln_ro" "${kiln_x%% *}" ;;
    0)
      kiln_ri=$((kiln_ri + 1)) ;;
    *)
      # a line for the shell ("kiln_... #kiln", maybe after a ^C): leave and run it; our own
      # start line again (the host missed our answer): answer again; else junk: let the line
      # go quiet, then ask for the frame again
      case $kiln_h in *"$kiln_nl"*) ;; *) kiln_h=$kiln_h$(head -n 1) ;; esac
      case $kiln_h in
      *kiln_*' #kiln')
        kiln_h=kiln_${kiln_h#*kiln_}
        case $kiln_h in "kiln_do $kiln_rn "*) printf 'KILN A %s %s\n' "$kiln_rn" "$kiln_ro"; continue;; esac
        set +o ignoreeof 2>/dev/null; stty isig min 1 time 0; eval "$kiln_h"; return ;;
      esac
      cat > /dev/null; kiln_ri=$((kiln_ri + 1)); printf 'KILN N %s %s junk\n' "$kiln_rn" "$kiln_ro" ;;
    esac
  done
  set +o ignoreeof 2>/dev/null; stty isig min 1 time 0
}

# kiln_init DIR "CRC LEN" NONCE: make and enter the work dir (relative: under $HOME), if DIR
# arrived intact (this line is not checked otherwise); answer with its real path and its cksum.
kiln_init() {
  if [ "$(printf %s "$1" | cksum)" != "$2" ]; then printf 'KILN I %s damaged\n' "$3"; return; fi
  case $1 in /*) kiln_wd=$1;; *) kiln_wd=$HOME/$1;; esac
  if kiln_e=$(mkdir -p "$kiln_wd/.kiln" 2>&1) && cd "$kiln_wd"; then
    kiln_d=$kiln_wd/.kiln; kiln_wd=$(pwd -P); printf 'KILN I %s ok %s %s\n' "$3" "$(printf %s "$kiln_wd" | cksum)" "$kiln_wd"
  else printf 'KILN I %s fail %s\n' "$3" "$(printf %s "$kiln_e" | tr '\n' ' ')"; fi
}
