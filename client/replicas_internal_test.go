package client

import (
	"net/netip"
	"slices"
	"testing"
)

func TestDialable(t *testing.T) {
	parse := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	tests := []struct {
		name     string
		in, want []netip.Addr
	}{
		{"none", nil, nil},
		{"sorted and distinct", parse("10.0.0.3", "10.0.0.1", "10.0.0.3"), parse("10.0.0.1", "10.0.0.3")},
		{"IPv4 preferred", parse("::1", "127.0.0.1", "fd00::2"), parse("127.0.0.1")},
		{"mapped is IPv4", parse("::ffff:10.0.0.1", "10.0.0.1", "fd00::1"), parse("10.0.0.1")},
		{"IPv6 only", parse("fd00::2", "fd00::1"), parse("fd00::1", "fd00::2")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := dialable(slices.Clone(tt.in)); !slices.Equal(got, tt.want) {
				t.Errorf("dialable(%v) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}
