<?php
// A tiny "real app" for tests/test_php_app.py: plain PHP sockets, as an App Engine app
// would use them. Run as `php -n fsock.php '<json list of checks>'`; each check is
// {"name", "mode", "url", "port"} with mode:
//   echo    connect, read the lab echo server's first line (JSON: the peer it saw),
//           send a line and read it back
//   dns     DNS query (A of "qname", default smtp.gmail.com) over the stream: TCP with
//           a length prefix, UDP as one datagram
//   connect connect only
// Prints one JSON object: name -> {ok, errno, errstr, ms (connect time), ...}.
ini_set('display_errors', 'stderr');

function dns_query(string $qname): string {
    $q = pack('nnnnnn', 0x5067, 0x0100, 1, 0, 0, 0);  // id, RD, one question
    foreach (explode('.', $qname) as $label) {
        $q .= chr(strlen($label)) . $label;
    }
    return $q . "\0" . pack('nn', 1, 1);                // A, IN
}

function skip_name(string $m, int $o): int {
    while ($o < strlen($m)) {
        $len = ord($m[$o]);
        if ($len === 0) return $o + 1;
        if (($len & 0xC0) === 0xC0) return $o + 2;    // compression pointer
        $o += $len + 1;
    }
    return $o;
}

function dns_answers(string $m): array {
    if (strlen($m) < 12) return [];
    $h = unpack('nid/nflags/nqd/nan', substr($m, 0, 8));
    $o = 12;
    for ($i = 0; $i < $h['qd']; $i++) $o = skip_name($m, $o) + 4;
    $out = [];
    for ($i = 0; $i < $h['an'] && $o < strlen($m); $i++) {
        $o = skip_name($m, $o);
        $rr = unpack('ntype/nclass/Nttl/nlen', substr($m, $o, 10));
        $o += 10;
        if ($rr['type'] === 1 && $rr['len'] === 4) $out[] = inet_ntop(substr($m, $o, 4));
        $o += $rr['len'];
    }
    return $out;
}

function read_exactly($fp, int $n): string {
    $buf = '';
    while (strlen($buf) < $n && !feof($fp)) {
        $chunk = fread($fp, $n - strlen($buf));
        if ($chunk === false || $chunk === '') break;
        $buf .= $chunk;
    }
    return $buf;
}

$results = [];
foreach (json_decode($argv[1], true) as $c) {
    $t0 = microtime(true);
    $fp = @fsockopen($c['url'], $c['port'], $errno, $errstr, 3);
    $r = ['ok' => $fp !== false, 'errno' => $errno, 'errstr' => $errstr,
          'ms' => round((microtime(true) - $t0) * 1000, 1)];
    if ($fp !== false) {
        stream_set_timeout($fp, 3);
        if ($c['mode'] === 'echo') {
            $r['line'] = json_decode(trim((string) fgets($fp)), true);
            fwrite($fp, "hello from php\n");
            $r['echo'] = trim((string) fgets($fp));
        } elseif ($c['mode'] === 'dns') {
            $q = dns_query($c['qname'] ?? 'smtp.gmail.com');
            if (str_starts_with($c['url'], 'udp://')) {
                fwrite($fp, $q);
                $m = fread($fp, 4096);
            } else {
                fwrite($fp, pack('n', strlen($q)) . $q);
                $len = unpack('n', read_exactly($fp, 2) . "\0\0")[1];
                $m = read_exactly($fp, $len);
            }
            $r['answers'] = dns_answers((string) $m);
        }
        fclose($fp);
    }
    $results[$c['name']] = $r;
}
echo json_encode($results), "\n";
