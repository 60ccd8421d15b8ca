// vmoe-bench: run the Core ML benchmark on a Mac and write the bench result JSON (schema 1.0).
//   swift run -c release vmoe-bench --model M.mlpackage [--compute-units all] [--warmup 10] [--iterations 50]
//                                   [--sidecar M.mlpackage.json --images DIR] [--output result.json]
import Foundation
import VMoEBench

#if os(macOS)
    func usage() -> Never {
        FileHandle.standardError.write(
            Data(
                ("usage: vmoe-bench --model M.mlpackage [--compute-units all|cpuOnly|cpuAndGPU|cpuAndNeuralEngine] "
                    + "[--warmup 10] [--iterations 50] [--sidecar M.mlpackage.json --images DIR] "
                    + "[--output result.json]\n").utf8))
        exit(2)
    }

    var options: [String: String] = ["--compute-units": "all", "--warmup": "10", "--iterations": "50",
                                     "--output": "vmoe_bench.json"]
    var args = CommandLine.arguments.dropFirst()
    while let key = args.popFirst() {
        guard options.keys.contains(key) || ["--model", "--sidecar", "--images"].contains(key),
            let value = args.popFirst()
        else { usage() }
        options[key] = value
    }
    guard let modelPath = options["--model"], let warmup = Int(options["--warmup"]!),
        let iterations = Int(options["--iterations"]!)
    else { usage() }

    do {
        let config = BenchConfig(
            modelURL: URL(fileURLWithPath: modelPath), computeUnits: options["--compute-units"]!, warmup: warmup,
            iterations: iterations, sidecarURL: options["--sidecar"].map { URL(fileURLWithPath: $0) },
            imagesURL: options["--images"].map { URL(fileURLWithPath: $0) })
        let result = try await CoreMLBenchmark.run(config)
        let out = URL(fileURLWithPath: options["--output"]!)
        try ResultWriter.write(result, to: out)
        let s = result.stats
        print(String(format: "p50 %.3f ms, p90 %.3f ms, mean %.3f ± %.3f ms (n=%ld), cold load %.1f ms -> %@",
                     s.p50, s.p90, s.mean, s.std, s.count, result.coldLoadMs, out.path))
    } catch {
        FileHandle.standardError.write(Data("vmoe-bench: error: \(error)\n".utf8))
        exit(1)
    }
#else
    print("vmoe-bench runs on macOS; on iOS use the VMoEBenchTests test target (see README.md)")
#endif
