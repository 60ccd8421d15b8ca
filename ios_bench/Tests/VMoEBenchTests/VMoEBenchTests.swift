import Foundation
import XCTest

@testable import VMoEBench

/// Runs the benchmark from environment variables. With xcodebuild, set them with the TEST_RUNNER_ prefix
/// (xcodebuild strips it and passes the rest to the test process):
///   VMOE_MODEL           the .mlpackage: a file name under Tests/VMoEBenchTests/Models (bundled), or a path (macOS)
///   VMOE_COMPUTE_UNITS   all | cpuOnly | cpuAndGPU | cpuAndNeuralEngine (default all)
///   VMOE_WARMUP          warm-up predictions (default 10)
///   VMOE_ITERATIONS      timed predictions (default 50)
///   VMOE_OUTPUT          where to write the JSON (default Documents/VMOE_RESULT_NAME)
///   VMOE_RESULT_NAME     file name in Documents (default vmoe_bench.json)
final class VMoEBenchTests: XCTestCase {
    func resolveModel(_ spec: String) throws -> URL {
        if FileManager.default.fileExists(atPath: spec) { return URL(fileURLWithPath: spec) }
        if let url = Bundle.module.url(forResource: spec, withExtension: nil, subdirectory: "Models") { return url }
        throw BenchError.modelNotFound("\(spec) (neither a path nor a resource under Models/)")
    }

    func testBenchmark() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let spec = env["VMOE_MODEL"], !spec.isEmpty else {
            throw XCTSkip("set VMOE_MODEL (TEST_RUNNER_VMOE_MODEL with xcodebuild) to run the benchmark")
        }
        let config = BenchConfig(
            modelURL: try resolveModel(spec),
            computeUnits: env["VMOE_COMPUTE_UNITS"] ?? "all",
            warmup: Int(env["VMOE_WARMUP"] ?? "") ?? 10,
            iterations: Int(env["VMOE_ITERATIONS"] ?? "") ?? 50
        )
        let result = try await CoreMLBenchmark.run(config)
        let out =
            env["VMOE_OUTPUT"].map { URL(fileURLWithPath: $0) }
            ?? ResultWriter.documentsURL(name: env["VMOE_RESULT_NAME"] ?? "vmoe_bench.json")
        let data = try ResultWriter.write(result, to: out)

        // Three ways for the host to get the result: the file (devicectl copy from), the log, the .xcresult.
        print(ResultWriter.beginMarker)
        print(String(decoding: data, as: UTF8.self))
        print(ResultWriter.endMarker)
        let attachment = XCTAttachment(data: data, uniformTypeIdentifier: "public.json")
        attachment.name = out.lastPathComponent
        attachment.lifetime = .keepAlways
        add(attachment)

        XCTAssertEqual(result.samplesMs.count, config.iterations)
        XCTAssertEqual(result.stats, Stats(samples: result.samplesMs))
        XCTAssertGreaterThan(result.coldLoadMs, 0)
        let decoded = try JSONDecoder().decode(BenchResult.self, from: data)
        XCTAssertEqual(decoded.schemaVersion, "1.0")
    }

    func testStatsFollowNumpyConventions() {
        // numpy.percentile([4, 1, 3, 2, 10], [50, 90, 99]) == [3.0, 7.6, 9.76]; np.std (ddof=0)
        let s = Stats(samples: [4, 1, 3, 2, 10])
        XCTAssertEqual(s.count, 5)
        XCTAssertEqual(s.p50, 3.0, accuracy: 1e-12)
        XCTAssertEqual(s.p90, 7.6, accuracy: 1e-12)
        XCTAssertEqual(s.p99, 9.76, accuracy: 1e-12)
        XCTAssertEqual(s.mean, 4.0, accuracy: 1e-12)
        XCTAssertEqual(s.std, (50.0 / 5.0).squareRoot(), accuracy: 1e-12)
        XCTAssertEqual(s.min, 1)
        XCTAssertEqual(s.max, 10)
    }

    func testResultEncodesNullsExplicitly() throws {
        let json = try JSONSerialization.jsonObject(
            with: ResultWriter.encode(
                BenchResult(
                    createdAt: "2024-01-01T00:00:00Z", harness: Harness(isolatedProcess: false),
                    device: Device(model: "iPhone16,1", os: "iOS", osVersion: "17.5.0", chip: nil, cpuCount: 6),
                    runtime: Runtime(name: "coreml", version: "17.5.0"),
                    backend: Backend(name: "coreml", computeUnits: "all", threads: nil, delegates: [], computePlan: nil),
                    model: ModelInfo(path: "m.mlpackage", format: "mlpackage", sizeBytes: 1, name: nil, sidecar: nil,
                                     routing: nil),
                    precision: nil, input: InputInfo(shape: [1, 3, 32, 32], dtype: "float32", source: "random", images: nil),
                    warmupIterations: 0, timedIterations: 1, coldLoadMs: 1, loadBreakdownMs: ["load": 1],
                    firstInferenceMs: 1, samplesMs: [1], stats: Stats(samples: [1]), memory: Memory(),
                    thermalBefore: nil, thermalAfter: nil, latencyPerExpert: nil, notes: []))) as! [String: Any]
        XCTAssertTrue(json["precision"] is NSNull)
        XCTAssertTrue(json["latency_per_expert"] is NSNull)
        XCTAssertTrue((json["device"] as! [String: Any])["chip"] is NSNull)
        XCTAssertEqual(json["schema_version"] as? String, "1.0")
    }
}
