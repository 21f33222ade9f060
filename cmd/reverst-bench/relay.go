package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"sync"
	"time"
)

// relayMain is the relay role, a reference hop between the load generator
// and the backend, measured beside the tunnel. By default it is a bare TCP
// relay to -target (no HTTP, no TLS, a goroutine per direction), the least
// any process in the path can cost: this machine's price of one more
// process. With -http it is the standard library's reverse proxy
// (net/http.Server and httputil.ReverseProxy with default settings), what
// one more idiomatic Go HTTP hop costs. It prints "relay ADDR" on stdout
// and runs until stdin closes.
func relayMain(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	target := fs.String("target", "", "address to relay to")
	httpProxy := fs.Bool("http", false, "proxy HTTP with httputil.ReverseProxy instead of relaying bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	context.AfterFunc(ctx, func() { ln.Close() })
	fmt.Fprintf(stdout, "relay %s\n", ln.Addr())

	if *httpProxy {
		srv := &http.Server{
			Handler:           httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: *target}),
			ReadHeaderTimeout: 10 * time.Second,
		}
		context.AfterFunc(ctx, func() { srv.Close() })
		if err := srv.Serve(ln); ctx.Err() == nil {
			return err
		}
		return nil
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		in, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Go(func() {
			defer in.Close()
			out, err := net.Dial("tcp", *target)
			if err != nil {
				return
			}
			defer out.Close()
			stop := context.AfterFunc(ctx, func() { in.Close(); out.Close() })
			defer stop()
			done := make(chan struct{})
			go func() {
				_, _ = io.Copy(out, in)
				_ = out.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			_, _ = io.Copy(in, out)
			_ = in.(*net.TCPConn).CloseWrite()
			<-done
		})
	}
}
